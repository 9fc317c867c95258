"""Allow ``python3 -m plugin_runner``."""

import sys

from plugin_runner.main import main

sys.exit(main())
