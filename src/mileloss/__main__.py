"""``python -m mileloss <verb>`` (also what ``torchrun -m mileloss train`` runs)."""

import sys

from mileloss.cli import main

sys.exit(main())
