"""``python -m prunekit`` (and ``torchrun ... -m prunekit prune ... --distributed``): the command line."""

import sys

from prunekit.cli import main

sys.exit(main())
