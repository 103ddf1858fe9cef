"""`python -m modular` is the `modular` command (so `torchrun -m modular ...` works)."""

import sys

from modular.cli import main

sys.exit(main())
