"""The `gradient` M-step (the paper's implementation), split by job; see :mod:`.engine`."""

from primaps_dist.em.gradient.engine import *  # noqa: F401,F403
from primaps_dist.em.gradient.engine import __all__, _gaussian_blur, load_deepspeed_config  # noqa: F401
