"""`PYTHONPATH=tests python -m vm prepare|run [PYTEST ARGS...]` (see docs/testing-vm.md)."""

from __future__ import annotations

import sys

from vm.harness import main

sys.exit(main(sys.argv[1:]))
