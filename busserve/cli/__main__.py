"""``python -m busserve.cli``."""

import sys

from busserve.cli import main

sys.exit(main())
