"""The configuration schema: one small dataclass per component, each validating its own keys.

:class:`Config` holds the sections (``data``, ``backbone``, ``proposals``, ``crf``, ``em``, ``train``,
``checkpoint``, ``tracking``, ``dist``, ``eval``); :meth:`Config.validate` checks every key and the rules
across sections (the crop size against the backbone stride). Every problem is a one-line
:class:`~primaps_dist.errors.ConfigError` that names the dotted key. Reading YAML files and overrides into these
dataclasses is :mod:`primaps_dist.config.loading`'s job.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from primaps_dist.backbones.presets import PRESETS
from primaps_dist.crf.defaults import CONFIG_DOWNSAMPLE
from primaps_dist.crf.defaults import REFERENCE as _CRF_REFERENCE
from primaps_dist.errors import ConfigError
from primaps_dist.labels import IGNORE_INDEX


REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_shipped_path(path: str) -> str:
    """A relative path that does not exist in the working directory may name a file shipped in the
    repository (e.g. ``configs/deepspeed/zero0.json``); return the first one that exists, else ``path``."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    shipped = REPO_ROOT / path
    return str(shipped) if shipped.exists() else path


def _require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise ConfigError(key, problem)


def _require_factor(value: int, key: str) -> None:
    """A resolution factor: an int >= 1 (bool refused, although it is an int)."""
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key,
             f"must be an integer >= 1, got {value!r}")


def _choice(value: str, choices: Sequence[str], key: str) -> None:
    _require(value in choices, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass
class DataConfig:
    """Where the shards are and how samples become batches."""

    # A directory of .tar shards, a glob, a brace pattern "dir/{000000..000009}.tar", a comma-separated list, or
    # remote: "https://host/data/" or "s3://bucket/prefix/" (listed by its index.json), "s3://b/{000..009}.tar",
    # "pipe:COMMAND" (see data/sources.py).
    train_shards: str = ""
    val_shards: str = ""
    cache_dir: str = ""  # local copy of remote shards (shared by the ranks of a node); "" = stream, no copy
    cache_limit_gb: float = 50.0  # least recently used shards leave data.cache_dir beyond this size
    s3_endpoint_url: str = ""  # "" = AWS_ENDPOINT_URL(_S3) or AWS itself; credentials: AWS_* variables
    s3_profile: str = ""  # a profile of ~/.aws/credentials instead of the AWS_* variables
    remote_retries: int = 5  # attempts per remote read before a shard counts as unusable
    remote_backoff_s: float = 1.0  # first wait between attempts; doubles up to 30 s
    remote_timeout_s: float = 60.0  # a connection that sends nothing this long counts as a failed attempt
    num_classes: int = 27  # K: number of prototypes and of ground-truth classes
    crop_size: int = 320  # square crop side in pixels; a multiple of the backbone stride
    train_scale: list[float] = field(default_factory=lambda: [1.0, 1.5])  # short side / crop, sampled uniformly
    hflip: bool = True
    # Samples per step over all ranks; the per-rank batch is this / the number of ranks (which must divide it).
    # The training order depends on (train.seed, data, global_batch_size, step) only: the same prototypes on any
    # number of GPUs (data/order.py). 0 = data.batch_size x the number of ranks.
    global_batch_size: int = 0
    batch_size: int = 8  # per rank, used only when global_batch_size is 0
    eval_batch_size: int = 8  # per rank
    num_workers: int = 2  # loader processes per rank
    streams: int = 0  # logical training streams (0 = global_batch_size); divides it, a multiple of the ranks
    shuffle_buffer: int = 256  # samples in the shuffle buffers of all streams together (each within its shard)
    shuffle_buffer_mb: float = 512.0  # byte budget of those buffers (decoded crops); bounds any worker's share
    max_corrupt_fraction: float = 0.1  # stop with an error when more samples than this are unreadable

    def validate(self, prefix: str = "data") -> None:
        _require(self.num_classes >= 2, f"{prefix}.num_classes", f"must be >= 2, got {self.num_classes}")
        _require(self.num_classes < IGNORE_INDEX, f"{prefix}.num_classes", f"must be < {IGNORE_INDEX}")
        _require(self.crop_size >= 16, f"{prefix}.crop_size", f"must be >= 16, got {self.crop_size}")
        _require(
            len(self.train_scale) == 2 and 1.0 <= self.train_scale[0] <= self.train_scale[1],
            f"{prefix}.train_scale",
            f"must be [low, high] with 1 <= low <= high, got {list(self.train_scale)}",
        )
        _require(self.batch_size >= 1, f"{prefix}.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.eval_batch_size >= 1, f"{prefix}.eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        _require(self.num_workers >= 0, f"{prefix}.num_workers", f"must be >= 0, got {self.num_workers}")
        _require(self.cache_limit_gb > 0, f"{prefix}.cache_limit_gb", f"must be > 0, got {self.cache_limit_gb}")
        _require(self.remote_retries >= 1, f"{prefix}.remote_retries", f"must be >= 1, got {self.remote_retries}")
        _require(self.remote_backoff_s >= 0, f"{prefix}.remote_backoff_s", f"must be >= 0, got {self.remote_backoff_s}")
        _require(self.remote_timeout_s > 0, f"{prefix}.remote_timeout_s", f"must be > 0, got {self.remote_timeout_s}")
        _require(self.shuffle_buffer >= 0, f"{prefix}.shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        _require(self.shuffle_buffer_mb >= 0, f"{prefix}.shuffle_buffer_mb",
                 f"must be >= 0, got {self.shuffle_buffer_mb}")
        _require(self.global_batch_size >= 0, f"{prefix}.global_batch_size",
                 f"must be >= 0, got {self.global_batch_size}")
        _require(self.streams >= 0, f"{prefix}.streams", f"must be >= 0, got {self.streams}")
        if self.global_batch_size and self.streams:
            _require(self.global_batch_size % self.streams == 0, f"{prefix}.streams",
                     f"{self.streams} does not divide data.global_batch_size={self.global_batch_size}")
        _require(
            0.0 <= self.max_corrupt_fraction <= 1.0,
            f"{prefix}.max_corrupt_fraction",
            f"must be in [0, 1], got {self.max_corrupt_fraction}",
        )


@dataclass
class BackboneConfig:
    """The frozen feature extractor."""

    name: str = "efficientnet_lite0"  # a preset (see backbones/presets.py), "timm:<model name>", or "module:function"
    weights: str = "pretrained"  # "pretrained" (hub or packaged), "random", or a path to a local weights file
    layers: list[int] = field(default_factory=list)  # ViT: [block index]; CNN: stage indices; [] = preset default
    stride: int = 0  # feature stride for non-preset backbones (0 = preset's or detected)
    precision: str = "auto"  # autocast dtype on GPU: auto (bf16 if supported) | bf16 | fp16 | fp32
    head_weights: str = ""  # trained projection head (STEGO / HP style) applied to the features; "" = none

    def validate(self, prefix: str = "backbone") -> None:
        _require(bool(self.name), f"{prefix}.name", "must not be empty")
        is_plugin = ":" in self.name
        _require(
            is_plugin or self.name in PRESETS,
            f"{prefix}.name",
            f"unknown preset {self.name!r}; use one of {', '.join(PRESETS)}, 'timm:<model>' or 'module:function'",
        )
        if self.name.startswith("timm:"):
            _require(len(self.name) > 5, f"{prefix}.name", "'timm:' needs a model name after the colon")
        _require(bool(self.weights), f"{prefix}.weights", "must be 'pretrained', 'random' or a file path")
        if self.weights not in ("pretrained", "random"):
            _require(os.path.isfile(self.weights), f"{prefix}.weights", f"file not found: {self.weights}")
        if self.name in PRESETS and PRESETS[self.name].kind == "vit":
            _require(len(self.layers) <= 1, f"{prefix}.layers", "a ViT takes one block index")
        _require(self.stride >= 0, f"{prefix}.stride", f"must be >= 0, got {self.stride}")
        _choice(self.precision, ("auto", "bf16", "fp16", "fp32"), f"{prefix}.precision")
        if self.head_weights:
            self._validate_head(f"{prefix}.head_weights")

    def _validate_head(self, key: str) -> None:
        """Read the (small) head file now, and check its input channels where the config alone tells the
        backbone's; otherwise the builder checks them right after building the backbone."""
        _require(os.path.isfile(self.head_weights), key, f"file not found: {self.head_weights}")
        from primaps_dist.backbones.head import load_projection_head

        channels = None
        preset = PRESETS.get(self.name)
        if preset is not None and (preset.kind == "vit" or list(self.layers) in ([], list(preset.default_layers))):
            channels = preset.channels
        load_projection_head(self.head_weights, channels, self.name)

    def preset_stride(self) -> int:
        """Feature stride known before building the model (0 when only the built model can tell)."""
        if self.stride:
            return self.stride
        if self.name in PRESETS:
            preset = PRESETS[self.name]
            if preset.kind == "cnn" and self.layers:
                return 2 ** (min(self.layers) + 1)
            return preset.stride
        return 0


@dataclass
class ProposalConfig:
    """PriMaPs principal mask proposals (docs/method.md, "2. Principal mask proposals")."""

    threshold: float = 0.4
    coverage: float = 0.95
    max_masks: int = 64
    median_filter: bool = True
    label_size: int = 0  # side of the pseudo-label map in pixels (0 = crop size)

    def validate(self, prefix: str = "proposals") -> None:
        _require(0.0 < self.threshold < 1.0, f"{prefix}.threshold", f"must be in (0, 1), got {self.threshold}")
        _require(0.0 < self.coverage <= 1.0, f"{prefix}.coverage", f"must be in (0, 1], got {self.coverage}")
        _require(self.max_masks >= 1, f"{prefix}.max_masks", f"must be >= 1, got {self.max_masks}")
        _require(self.label_size >= 0, f"{prefix}.label_size", f"must be >= 0, got {self.label_size}")


@dataclass
class CRFConfig:
    """Dense CRF refinement of proposals (defaults: the reference parameters, except ``downsample``).

    The default values live in :mod:`primaps_dist.crf.defaults` (shared with :func:`primaps_dist.crf.dense_crf`
    and :func:`primaps_dist.crf.make_crf`); change them there.

    ``downsample`` (torch backend only; pydensecrf always works at full resolution) runs all but the
    last mean-field update of the pseudo-label CRF on a grid that many times coarser per side; 1 runs
    every update at full resolution like the reference. The trade-off (speed against agreement with
    pydensecrf, and quality) is measured in README, "Results", and docs/quality.md. Aim for a grid
    about twice the feature grid (320 px pseudo labels, stride 8: 4). ``eval.crf`` has its own factor.
    """

    backend: str = _CRF_REFERENCE.backend  # torch | pydensecrf | none
    iterations: int = _CRF_REFERENCE.iterations
    gaussian_sxy: float = _CRF_REFERENCE.gaussian_sxy
    gaussian_weight: float = _CRF_REFERENCE.gaussian_weight
    bilateral_sxy: float = _CRF_REFERENCE.bilateral_sxy
    bilateral_srgb: float = _CRF_REFERENCE.bilateral_srgb
    bilateral_weight: float = _CRF_REFERENCE.bilateral_weight
    downsample: int = CONFIG_DOWNSAMPLE  # torch backend only; see the class docstring and crf.dense_crf

    def validate(self, prefix: str = "crf") -> None:
        _choice(self.backend, ("torch", "pydensecrf", "none"), f"{prefix}.backend")
        _require(self.iterations >= 1, f"{prefix}.iterations", f"must be >= 1, got {self.iterations}")
        _require_factor(self.downsample, f"{prefix}.downsample")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            value = getattr(self, name)
            _require(value > 0, f"{prefix}.{name}", f"must be > 0, got {value}")
        for name in ("gaussian_weight", "bilateral_weight"):
            value = getattr(self, name)
            _require(value >= 0, f"{prefix}.{name}", f"must be >= 0, got {value}")


@dataclass
class EMConfig:
    """The prototype update (docs/method.md, "4. The prototype update")."""

    mode: str = "stats"  # stats | gradient
    momentum: float = 0.98  # stats mode: moving-average factor b of the sufficient statistics
    engine: str = "ddp"  # gradient mode: ddp | deepspeed
    deepspeed_config: str = "configs/deepspeed/zero0.json"
    lr: float = 5e-3
    focal_gamma: float = 2.0
    ema_every: int = 10
    ema_max: float = 0.98
    photometric: bool = True  # gradient mode: the student sees a photometrically augmented view

    def validate(self, prefix: str = "em") -> None:
        _choice(self.mode, ("stats", "gradient"), f"{prefix}.mode")
        _choice(self.engine, ("ddp", "deepspeed"), f"{prefix}.engine")
        _require(0.0 <= self.momentum < 1.0, f"{prefix}.momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.lr > 0, f"{prefix}.lr", f"must be > 0, got {self.lr}")
        _require(self.focal_gamma >= 0, f"{prefix}.focal_gamma", f"must be >= 0, got {self.focal_gamma}")
        _require(self.ema_every >= 1, f"{prefix}.ema_every", f"must be >= 1, got {self.ema_every}")
        _require(0.0 < self.ema_max < 1.0, f"{prefix}.ema_max", f"must be in (0, 1), got {self.ema_max}")
        if self.mode == "gradient" and self.engine == "deepspeed":
            self.deepspeed_config = resolve_shipped_path(self.deepspeed_config)
            _require(
                os.path.isfile(self.deepspeed_config),
                f"{prefix}.deepspeed_config",
                f"file not found: {self.deepspeed_config}",
            )


@dataclass
class TrainConfig:
    """Stages and schedule; training is step based on an infinite resampled stream."""

    seed: int = 0
    output_dir: str = "runs/default"
    pca_steps: int = 20  # batches streamed into the all-reduced covariance for the PCA initialisation
    kmeans_steps: int = 100  # mini-batch spherical K-means steps (the "Baseline")
    em_steps: int = 1000  # PriMaPs-EM steps
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda
    verify_every: int = 0  # every N steps all-gather a prototype checksum and fail if ranks differ (0 = off)

    def validate(self, prefix: str = "train") -> None:
        _require(bool(self.output_dir), f"{prefix}.output_dir", "must not be empty")
        _require(self.pca_steps >= 1, f"{prefix}.pca_steps", f"must be >= 1, got {self.pca_steps}")
        _require(self.kmeans_steps >= 0, f"{prefix}.kmeans_steps", f"must be >= 0, got {self.kmeans_steps}")
        _require(self.em_steps >= 0, f"{prefix}.em_steps", f"must be >= 0, got {self.em_steps}")
        _require(self.log_every >= 1, f"{prefix}.log_every", f"must be >= 1, got {self.log_every}")
        _choice(self.device, ("auto", "cpu", "cuda"), f"{prefix}.device")
        _require(self.verify_every >= 0, f"{prefix}.verify_every", f"must be >= 0, got {self.verify_every}")


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    keep: int = 3
    resume: bool = True  # resume from the newest complete checkpoint in <output_dir>/checkpoints

    def validate(self, prefix: str = "checkpoint") -> None:
        _require(self.every_steps >= 1, f"{prefix}.every_steps", f"must be >= 1, got {self.every_steps}")
        _require(self.keep >= 1, f"{prefix}.keep", f"must be >= 1, got {self.keep}")


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "primaps-dist"
    run_name: str = ""
    system_metrics: bool = True
    num_overlays: int = 4  # validation images rendered as overlay pictures
    log_model: bool = True  # at the end of training, log the segmenter as an MLflow model (artifact "segmenter")
    register_model: str = ""  # register the run's segmenter model under this name ("" = log it, do not register)

    def validate(self, prefix: str = "tracking") -> None:
        _require(bool(self.experiment), f"{prefix}.experiment", "must not be empty")
        _require(self.register_model == "" or (len(self.register_model) <= 256 and all(
            ch.isalnum() or ch in "_-. " for ch in self.register_model) and self.register_model.strip() != ""),
            f"{prefix}.register_model", f"must be empty or a model name of letters, digits, '_', '-', '.', ' ' "
            f"(at most 256), got {self.register_model!r}")
        _require(self.num_overlays >= 0, f"{prefix}.num_overlays", f"must be >= 0, got {self.num_overlays}")
        _require(self.log_model or not self.register_model, f"{prefix}.register_model",
                 f"needs tracking.log_model=true (the registered version is the logged model), got {self.register_model!r}")


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl
    timeout_s: float = 600.0  # collective timeout: a dead peer ends the job with an error instead of a hang

    def validate(self, prefix: str = "dist") -> None:
        _choice(self.backend, ("auto", "gloo", "nccl"), f"{prefix}.backend")
        _require(self.timeout_s > 0, f"{prefix}.timeout_s", f"must be > 0, got {self.timeout_s}")


@dataclass
class EvalConfig:
    crf: bool = False  # refine predictions with the dense CRF (the crf section's parameters)
    # crf.downsample for that CRF; 1 = full resolution, the reference protocol (speed matters less here)
    crf_downsample: int = 1
    flip: bool = False  # average features of the image and its horizontal flip
    resize_short: int = 0  # short side before the centre crop (0 = crop size)

    def validate(self, prefix: str = "eval") -> None:
        _require(self.resize_short >= 0, f"{prefix}.resize_short", f"must be >= 0, got {self.resize_short}")
        _require_factor(self.crf_downsample, f"{prefix}.crf_downsample")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    em: EMConfig = field(default_factory=EMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        stride = self.backbone.preset_stride()
        if stride:
            _require(
                self.data.crop_size % stride == 0,
                "data.crop_size",
                f"{self.data.crop_size} is not a multiple of the backbone stride {stride} ({self.backbone.name})",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

