"""`python -m bigtrain ...` is the same as `bigtrain ...` (so `torchrun -m bigtrain train ...` works)."""
import sys

from bigtrain.cli import main

sys.exit(main())
