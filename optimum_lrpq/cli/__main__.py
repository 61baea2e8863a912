"""`python -m optimum_lrpq.cli`: the same as the `optimum-lrpq` console script."""

import sys

from .app import main

sys.exit(main())
