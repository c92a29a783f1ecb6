"""``python -m primaps_dist.tracking replay <output_dir> [--uri URI]`` (see :mod:`primaps_dist.tracking.replay`)."""

import sys

from primaps_dist.errors import run_cli
from primaps_dist.tracking.replay import main

sys.exit(run_cli(main))
