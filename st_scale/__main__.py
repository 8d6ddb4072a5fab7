"""`python -m st_scale ...` is `st-scale ...` (for job entrypoints where the script is not on PATH)."""

import sys

from .cli import main

sys.exit(main())
