"""Password-source plugins run by plugin-runner."""
