"""`python -m l1ra.app.compare ...`: the same as `l1ra compare ...`."""

import sys

from .cli import main

sys.exit(main())
