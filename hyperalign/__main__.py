"""``python -m hyperalign COMMAND ...`` (also ``accelerate launch -m hyperalign COMMAND ...``)."""

import sys

from hyperalign.cli import main

sys.exit(main())
