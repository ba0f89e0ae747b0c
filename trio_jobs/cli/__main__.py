"""``python -m trio_jobs.cli`` is the ``trio-jobs`` command."""

from __future__ import annotations

import sys

from .main import main

sys.exit(main())
