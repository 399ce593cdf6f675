"""``python -m pipeline.cli``: the ``recede`` command (used under ``torchrun``)."""

import sys

from pipeline.cli.main import main

sys.exit(main())
