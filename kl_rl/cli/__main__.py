"""`python -m kl_rl.cli ...`: the same as the `kl-rl` console script."""

import sys

from kl_rl.cli import main

sys.exit(main())
