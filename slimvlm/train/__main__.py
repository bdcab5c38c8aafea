"""`python -m slimvlm.train RECIPE ...` (what `torchrun -m` and `accelerate launch -m` run)."""

import sys

from .run import main

sys.exit(main())
