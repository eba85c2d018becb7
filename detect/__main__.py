"""``python -m detect`` (and ``torchrun -m detect``) runs the ``detect`` command."""

import sys

from detect.cli import main

sys.exit(main())
