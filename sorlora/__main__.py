"""``python -m sorlora`` is the ``sorlora`` command."""

import sys

from .cli import main

sys.exit(main())
