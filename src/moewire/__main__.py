"""``python -m moewire``: the same as the ``moewire`` command."""

import sys

from moewire.cli import main

sys.exit(main())
