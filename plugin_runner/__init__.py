"""plugin-runner: the cryptsetup keyscript that runs password plugins in parallel.

Standard library only, and only the cheap parts of it: this runs at every
boot before the root file system is unlocked.
"""

__version__ = "0.1.0"
