"""``python -m prunekit.cli``."""

import sys

from prunekit.cli import main

sys.exit(main())
