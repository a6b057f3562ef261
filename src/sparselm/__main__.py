"""``python -m sparselm`` is the ``sparselm`` command."""

import sys

from .cli.main import main

sys.exit(main())
