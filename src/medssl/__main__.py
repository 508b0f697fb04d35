"""``python -m medssl`` = the ``medssl`` command."""

import sys

from medssl.cli import main

sys.exit(main())
