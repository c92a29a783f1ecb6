"""The `gradient` M-step (the paper's implementation): running prototypes trained by Adam, momentum copy.

One module per job; every public name is re-exported here, so ``from primaps_dist.em.gradient import ...``
works as before the split:

* :mod:`.head`: theta_R, the weight-normalised head (:class:`PrototypeHead`), and the focal class-weighted
  cross entropy (:func:`focal_class_weighted_ce`, :func:`focal_class_weights`, :func:`global_focal_loss`).
* :mod:`.momentum`: theta_M, the EMA of the head's directions that makes the pseudo labels
  (:class:`MomentumPrototypes`).
* :mod:`.photometric`: the student's view (:func:`photometric_view`, its per-sample random numbers
  :func:`photometric_draws`, :class:`PhotometricParams`).
* :mod:`.engines`: the head behind DDP or DeepSpeed, one small interface (:class:`HeadEngine`,
  :func:`make_head_engine`, :func:`load_deepspeed_config`).
* :mod:`.checkpointing`: the engine's state to and from ``TrainState.gradient_state`` (and DeepSpeed's shard
  folder).
* :mod:`.engine`: :class:`GradientEngine` (:func:`make_engine`), one training step of theta_R then theta_M,
  and its :func:`step_metrics`.
"""

from primaps_dist.em.gradient.checkpointing import ShardedWriter, gradient_state, restore_gradient_state
from primaps_dist.em.gradient.engine import GradientEngine, make_engine, step_metrics
from primaps_dist.em.gradient.engines import (
    DDPEngine,
    DeepSpeedEngine,
    HeadEngine,
    load_deepspeed_config,
    make_head_engine,
)
from primaps_dist.em.gradient.head import (
    PrototypeHead,
    focal_class_weighted_ce,
    focal_class_weights,
    global_focal_loss,
)
from primaps_dist.em.gradient.momentum import MomentumPrototypes
from primaps_dist.em.gradient.photometric import (  # noqa: F401
    PhotometricParams,
    _gaussian_blur,
    photometric_draws,
    photometric_view,
)

__all__ = [
    "PrototypeHead",
    "MomentumPrototypes",
    "PhotometricParams",
    "photometric_draws",
    "photometric_view",
    "focal_class_weights",
    "focal_class_weighted_ce",
    "global_focal_loss",
    "HeadEngine",
    "DDPEngine",
    "DeepSpeedEngine",
    "load_deepspeed_config",
    "make_head_engine",
    "GradientEngine",
    "make_engine",
    "step_metrics",
    "ShardedWriter",
    "gradient_state",
    "restore_gradient_state",
]
