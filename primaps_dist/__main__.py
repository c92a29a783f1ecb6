import sys

from primaps_dist.cli import main

sys.exit(main())
