"""Typed, validated configuration: one small dataclass per component.

A run's configuration is the defaults, updated by a YAML file (``configs/*.yaml``) and then by
``section.key=value`` overrides from the command line. Every problem (an unknown key, a wrong type, an
impossible value) is a one-line :class:`~primaps_dist.errors.ConfigError` that names the dotted key.

* :mod:`.sections`: the schema (the section dataclasses, :class:`Config`) and its validation.
* :mod:`.loading`: YAML files and overrides into that schema (:func:`load_config`), configs stored in
  checkpoints, YAML output, flattening for MLflow.

Example::

    cfg = load_config("configs/demo.yaml", ["train.em_steps=200", "em.mode=gradient"])
"""

from primaps_dist.config.loading import (
    apply_overrides,
    config_from_dict,
    flatten,
    load_config,
    resolve_run_config,
    save_config,
)
from primaps_dist.config.sections import (
    REPO_ROOT,
    BackboneConfig,
    CheckpointConfig,
    Config,
    CRFConfig,
    DataConfig,
    DistConfig,
    EMConfig,
    EvalConfig,
    ProposalConfig,
    TrackingConfig,
    TrainConfig,
    resolve_shipped_path,
)

__all__ = [
    "REPO_ROOT",
    "BackboneConfig",
    "CheckpointConfig",
    "Config",
    "CRFConfig",
    "DataConfig",
    "DistConfig",
    "EMConfig",
    "EvalConfig",
    "ProposalConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "flatten",
    "load_config",
    "resolve_run_config",
    "resolve_shipped_path",
    "save_config",
]
