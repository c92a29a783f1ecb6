"""The `gradient` M-step (the paper's implementation): running prototypes trained by Adam, momentum copy.

* :class:`PrototypeHead` (theta_R): the paper's head, a weight-normalised bias-free 1x1 convolution on the
  UN-normalised features ``f``: ``logit_k = gain_k * <weight_k / ||weight_k||, f>
  = gain_k * ||f|| * cos(weight_k, f)``. ``weight`` ``[K, C]`` is weight norm's direction ``v`` and
  ``gain`` ``[K]`` its ``g``; both are trained; the gain starts at 1 (the reference sets ``weight_g = 1``
  after its PCA / K-means initialisation). The feature norm is the logit scale: mean ~70 (5-95 % of
  positions: 50-100) for the demo's EfficientNet-Lite0 layers [2, 3], on both generated sets; it depends
  on the backbone. The softmax is then peaked and the focal weights ``(1 - p_k)^2`` differ between
  frequent and rare classes. (A cosine head, ``|logit| <= 1``, gives every class a probability near 1/K
  and weights near ``(1 - 1/K)^2`` for all: no focal weighting.) The head is linear in ``f``, so logits
  at feature resolution upsampled bilinearly equal the reference's logits of upsampled features exactly.
  Prototypes (pseudo labels, predictions, evaluation, the ``stats`` mode, checkpoints) are the unit
  directions ``normalise(weight_k)``, predicted by ``argmax_k cos``: the per-pixel ``||f||`` does not
  change the argmax, and ``gain`` is left out on purpose (see :class:`MomentumPrototypes`).
* :func:`focal_class_weighted_ce`: cross entropy with class weights ``(1 - mean softmax prob of k)^gamma``
  (detached), ignore id 255, summed over labelled pixels and divided by ALL pixel positions (ignored ones
  included), as in the reference. With equal per-rank batch shapes and weights from the global batch
  (``focal_class_weights(..., sync=True)``) the DDP/DeepSpeed gradient average equals the single-process
  gradient on the concatenated batch.
* :class:`MomentumPrototypes` (theta_M): EMA of theta_R's direction ``weight`` (weight norm's ``v``),
  updated after every ``every``-th optimizer step; the k-th update uses decay ``min(1 - 1/k, max_decay)``:
  0 (a copy of theta_R), 0.5, 0.667, 0.75, ... up to 0.98, like the reference's EMA (whose first update
  copies the weights). Pseudo labels come from :attr:`MomentumPrototypes.prototypes`, the unit rows.
  theta_M's gain: the reference's theta_M is an EMA of the whole student head, ``g`` included, applied to
  un-normalised features, so it predicts ``argmax_k g_k * cos_k`` (its ``ConvClusterProbe`` that resets
  ``g`` to 1 and normalises the features is only the K-means-stage probe; it is replaced by the EMA model
  when EM training starts). Here theta_M has no gain and predicts ``argmax_k cos_k``, the rule shared with
  K-means, the ``stats`` mode and evaluation. Both agree while the gains stay equal (they start at 1);
  ``em/head_gain_min``/``max`` in the step metrics show how far they drift.
* :func:`photometric_view`: the student's view, on 0..1 RGB before any normalisation.
* :class:`GradientEngine` (:func:`make_engine`): the head behind DDP (only the head is wrapped) or
  DeepSpeed (:func:`make_head_engine`, one small :class:`HeadEngine` interface), plus theta_M.
  Logits are computed at feature resolution and upsampled bilinearly to the label size (cheaper than
  upsampling C-channel features as the reference does; K << C).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from primaps_dist import distributed
from primaps_dist.labels import IGNORE_INDEX
from primaps_dist.distributed import DistEnv
from primaps_dist.errors import UserError

__all__ = [
    "PrototypeHead",
    "MomentumPrototypes",
    "PhotometricParams",
    "photometric_view",
    "focal_class_weights",
    "focal_class_weighted_ce",
    "HeadEngine",
    "DDPEngine",
    "DeepSpeedEngine",
    "make_engine",
    "make_head_engine",
    "GradientEngine",
    "step_metrics",
]


# ------------------------------------------------------------------------------------------ head


class PrototypeHead(nn.Module):
    """Weight-normalised bias-free 1x1 conv ``[B, C, H, W] -> [B, K, H, W]`` from prototypes ``[K, C]``.

    ``logits[b, k] = gain[k] * <weight[k] / ||weight[k]||, features[b]>`` on the features as given (not
    normalised). ``weight`` ``[K, C]`` starts as the unit prototypes, ``gain`` ``[K]`` at 1.
    """

    def __init__(self, prototypes: torch.Tensor):
        super().__init__()
        if prototypes.dim() != 2:
            raise ValueError(f"prototypes must be [K, C], got shape {tuple(prototypes.shape)}")
        self.weight = nn.Parameter(F.normalize(prototypes.detach().to(torch.float32), dim=1).clone())
        self.gain = nn.Parameter(torch.ones(prototypes.shape[0], dtype=torch.float32, device=prototypes.device))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def effective_weight(self) -> torch.Tensor:
        """``gain[k] * weight[k] / ||weight[k]||``: the convolution's ``[K, C]`` weight (with autograd)."""
        return self.gain[:, None] * F.normalize(self.weight, dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4 or features.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"features must be [B, {self.weight.shape[1]}, H, W], got shape {tuple(features.shape)}"
            )
        return F.conv2d(features.to(torch.float32), self.effective_weight()[:, :, None, None])

    def prototypes(self) -> torch.Tensor:
        """Unit rows ``[K, C]`` float32, detached (the gain is not part of a prototype)."""
        return F.normalize(self.weight.detach(), dim=1)


# ------------------------------------------------------------------------------------------ loss


def _class_statistics(
    logits: torch.Tensor, labels: torch.Tensor | None, sync: bool, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean softmax probability per class ``[K]`` float64 and label counts ``[K]`` int64 of the batch.

    ``sync=True``: over the global batch, with ONE all-reduce of ``[2K+1]`` (every rank must call it).
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, K, H, W], got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    with torch.no_grad():
        probs = logits.detach().float().softmax(dim=1)
        positions = torch.tensor([probs[:, 0].numel()], dtype=torch.float64, device=logits.device)
        if labels is None:
            counts = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
        else:
            flat = labels.reshape(-1).to(logits.device).long()
            counts = torch.bincount(flat[flat != ignore_index], minlength=num_classes)[:num_classes].double()
        packed = torch.cat([probs.sum(dim=(0, 2, 3)).double(), positions, counts])
        if sync:
            distributed.all_reduce_sum(packed)
        mean_prob = packed[:num_classes] / packed[num_classes]
        return mean_prob, packed[num_classes + 1 :].round().to(torch.int64)


def _weights_from(mean_prob: torch.Tensor, gamma: float) -> torch.Tensor:
    return ((1.0 - mean_prob).clamp_min(0.0) ** gamma).to(torch.float32)


def focal_class_weights(logits: torch.Tensor, gamma: float, sync: bool = False) -> torch.Tensor:
    """``(1 - mean softmax probability of class k)^gamma`` over all positions of ``logits`` ``[B, K, H, W]``.

    Detached, float32 ``[K]``. ``sync=True`` averages over the global batch with one all-reduce (every
    rank must call it), so all ranks use the same weights.
    """
    mean_prob, _ = _class_statistics(logits, None, sync)
    return _weights_from(mean_prob, gamma)


def focal_class_weighted_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float,
    ignore_index: int = IGNORE_INDEX,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class-weighted cross entropy of ``logits`` ``[B, K, H, W]`` against ``labels`` ``[B, H, W]``.

    ``weights`` ``[K]`` defaults to :func:`focal_class_weights` of this batch. The sum over labelled pixels
    is divided by the number of pixel positions ``B*H*W`` (ignored pixels count as zero loss). Scalar.
    """
    shapes_ok = logits.dim() == 4 and labels.dim() == 3 and logits.shape[0] == labels.shape[0]
    if not shapes_ok or logits.shape[2:] != labels.shape[1:]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be [B, K, H, W] and [B, H, W]"
        )
    if weights is None:
        weights = focal_class_weights(logits, gamma)
    per_pixel = F.cross_entropy(
        logits.float(), labels.long(), weight=weights.to(logits.device), ignore_index=ignore_index, reduction="none"
    )
    return per_pixel.sum() / labels.numel()


# ------------------------------------------------------------------------------------------ momentum


class MomentumPrototypes:
    """theta_M: EMA of the running head's raw weight ``[K, C]``, updated every ``every`` optimizer steps."""

    def __init__(self, prototypes: torch.Tensor, every: int = 10, max_decay: float = 0.98):
        if every < 1:
            raise ValueError(f"EMA interval must be >= 1, got {every}")
        if not 0.0 < max_decay < 1.0:
            raise ValueError(f"EMA maximum decay must be in (0, 1), got {max_decay}")
        self.weight = F.normalize(prototypes.detach().to(torch.float32), dim=1).clone()
        self.every = every
        self.max_decay = max_decay
        self.steps = 0  # optimizer steps seen
        self.updates = 0  # EMA updates done

    @staticmethod
    def decay_for_update(k: int, max_decay: float) -> float:
        """Decay of the k-th update (k >= 1): ``min(1 - 1/k, max_decay)``."""
        if k < 1:
            raise ValueError(f"update index must be >= 1, got {k}")
        return min(1.0 - 1.0 / k, max_decay)

    @property
    def prototypes(self) -> torch.Tensor:
        """Unit rows ``[K, C]`` float32: the prototypes that make pseudo labels."""
        return F.normalize(self.weight, dim=1)

    @torch.no_grad()
    def step(self, running_weight: torch.Tensor) -> float | None:
        """Count one optimizer step; on every ``every``-th, blend in ``running_weight``. Returns the decay used."""
        self.steps += 1
        if self.steps % self.every:
            return None
        self.updates += 1
        decay = self.decay_for_update(self.updates, self.max_decay)
        source = running_weight.detach().to(device=self.weight.device, dtype=torch.float32)
        self.weight = decay * self.weight + (1.0 - decay) * source
        return decay

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "weight": self.weight.clone(),
            "steps": torch.tensor(self.steps, dtype=torch.int64),
            "updates": torch.tensor(self.updates, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["weight"].shape) != tuple(self.weight.shape):
            shape, expected = tuple(state["weight"].shape), tuple(self.weight.shape)
            raise ValueError(f"momentum prototypes 'weight' has shape {shape}, expected {expected}")
        self.weight = state["weight"].to(device=self.weight.device, dtype=torch.float32).clone()
        self.steps = int(state["steps"])
        self.updates = int(state["updates"])


# ------------------------------------------------------------------------------------------ student view


@dataclass(frozen=True)
class PhotometricParams:
    """The reference's student augmentation: blur always; then either jitter or greyscale branch."""

    blur_sigma: tuple[float, float] = (0.1, 2.0)  # sigma ~ U(low, high), per image
    blur_kernel: int = 21
    jitter_branch_p: float = 0.5  # else the greyscale branch
    jitter_p: float = 0.3  # inside the jitter branch
    brightness: float = 0.1  # factor ~ U(1 - x, 1 + x)
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.1  # shift ~ U(-x, x) of a full turn
    greyscale_p: float = 0.1  # inside the greyscale branch


_LUMA = (0.299, 0.587, 0.114)


def _luminance(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable blur with a per-image sigma ``[B]``: one grouped convolution per axis."""
    batch, channels, height, width = images.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, dtype=images.dtype, device=images.device)
    kernels = torch.exp(-(offsets[None, :] ** 2) / (2.0 * sigma[:, None] ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # [B, k]
    kernels = kernels.repeat_interleave(channels, dim=0)  # [B*3, k]
    mode = "reflect" if half < min(height, width) else "replicate"
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (half, half, half, half), mode=mode)
    flat = F.conv2d(flat, kernels[:, None, :, None], groups=batch * channels)
    flat = F.conv2d(flat, kernels[:, None, None, :], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def _hue_rotate(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate chroma in YIQ space by ``turns`` ``[B]`` of a full circle (luma preserved)."""
    to_yiq64 = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
    )
    to_rgb = torch.linalg.inv(to_yiq64).to(device=images.device, dtype=images.dtype)
    to_yiq = to_yiq64.to(device=images.device, dtype=images.dtype)
    angle = 2.0 * math.pi * turns
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(turns.shape[0], 3, 3, dtype=images.dtype, device=images.device)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    matrices = to_rgb @ rotation @ to_yiq  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", matrices, images)


def _colour_jitter(images: torch.Tensor, brightness, contrast, saturation, hue) -> torch.Tensor:
    """Brightness, contrast, saturation, hue (fixed order), each factor per image ``[B]``; clamped to 0..1."""
    view = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    images = (images * view(brightness)).clamp(0.0, 1.0)
    mean_grey = _luminance(images).mean(dim=(1, 2, 3), keepdim=True)
    images = (view(contrast) * images + (1.0 - view(contrast)) * mean_grey).clamp(0.0, 1.0)
    images = (view(saturation) * images + (1.0 - view(saturation)) * _luminance(images)).clamp(0.0, 1.0)
    return _hue_rotate(images, hue).clamp(0.0, 1.0)


def photometric_view(
    images: torch.Tensor, generator: torch.Generator, params: PhotometricParams = PhotometricParams()
) -> torch.Tensor:
    """Photometrically augmented copy of ``images`` ``[B, 3, H, W]`` with values in 0..1 (un-normalised).

    Per image: Gaussian blur (sigma ~ U(0.1, 2), 21 taps, reflect padding); then with probability
    ``jitter_branch_p`` the jitter branch (colour jitter with probability ``jitter_p``), else the
    greyscale branch (greyscale with probability ``greyscale_p``) -- the reference's recipe. Random
    numbers come from ``generator`` (a CPU ``torch.Generator``) in a fixed order, so a seeded generator
    gives the same views on any device. Hue is rotated in YIQ space (an approximation of an HSV hue
    shift that keeps luma). Returns a new tensor of the input dtype, clamped to 0..1.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be floating point in 0..1, got {images.dtype}")
    batch = images.shape[0]
    uniform = torch.rand(8, batch, generator=generator, dtype=torch.float64)
    low, high = params.blur_sigma
    sigma = low + (high - low) * uniform[0]
    jitter_branch = uniform[1] < params.jitter_branch_p
    do_jitter = jitter_branch & (uniform[2] < params.jitter_p)
    do_grey = ~jitter_branch & (uniform[3] < params.greyscale_p)
    brightness = 1.0 + params.brightness * (2.0 * uniform[4] - 1.0)
    contrast = 1.0 + params.contrast * (2.0 * uniform[5] - 1.0)
    saturation = 1.0 + params.saturation * (2.0 * uniform[6] - 1.0)
    hue = params.hue * (2.0 * uniform[7] - 1.0)

    device, dtype = images.device, images.dtype
    work = images.to(torch.float32)
    out = _gaussian_blur(work, sigma.to(device=device, dtype=torch.float32), params.blur_kernel)
    jitter_index = do_jitter.nonzero().flatten().to(device)
    if jitter_index.numel():
        pick = lambda t: t[do_jitter].to(device=device, dtype=torch.float32)  # noqa: E731
        out[jitter_index] = _colour_jitter(
            out[jitter_index], pick(brightness), pick(contrast), pick(saturation), pick(hue)
        )
    grey_index = do_grey.nonzero().flatten().to(device)
    if grey_index.numel():
        out[grey_index] = _luminance(out[grey_index]).expand(-1, 3, -1, -1)
    return out.clamp(0.0, 1.0).to(dtype)


# ------------------------------------------------------------------------------------------ engines


def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _loss(
    model: nn.Module, features: torch.Tensor, labels: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Focal loss of the upsampled logits with global class weights; also the global label counts ``[K]``
    int64 and the focal class weights ``[K]`` float32 (identical on every rank)."""
    logits = _upsample(model(features), tuple(labels.shape[-2:]))
    mean_prob, counts = _class_statistics(logits, labels, sync=True)
    weights = _weights_from(mean_prob, gamma)
    return focal_class_weighted_ce(logits, labels, gamma, weights=weights), counts, weights


class HeadEngine(Protocol):
    """What the trainer needs from an engine that trains a :class:`PrototypeHead`.

    ``step`` is collective (every rank calls it with a batch of the same shape); it returns the detached
    loss, the global pseudo-label counts per class ``[K]`` int64 and the focal class weights ``[K]``.
    ``state_dict``/``load_state_dict`` hold what is replicated on every rank (rank 0 may write it);
    ``save_checkpoint``/``load_checkpoint`` are collective and write/read the engine's sharded state in a
    directory (DeepSpeed; no-ops for DDP).
    """

    head: PrototypeHead
    name: str
    sharded: bool  # True when save_checkpoint holds state that state_dict lacks

    def step(
        self, features: torch.Tensor, labels: torch.Tensor, gamma: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_checkpoint(self, directory: str | os.PathLike) -> None: ...

    def load_checkpoint(self, directory: str | os.PathLike) -> None: ...


class DDPEngine:
    """Adam on the head; DistributedDataParallel over the head only when more than one rank."""

    name = "ddp"
    sharded = False

    def __init__(self, head: PrototypeHead, lr: float, env: DistEnv):
        self.head = head
        if distributed.is_distributed():
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            with distributed.guard_collective("ddp init"):
                self.model: nn.Module = nn.parallel.DistributedDataParallel(head, device_ids=device_ids)
        else:
            self.model = head
        self.optimizer = torch.optim.Adam(head.parameters(), lr=lr)

    def step(
        self, features: torch.Tensor, labels: torch.Tensor, gamma: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        with distributed.guard_collective("ddp step"):
            loss, counts, weights = _loss(self.model, features, labels, gamma)
            loss.backward()
        self.optimizer.step()
        return loss.detach(), counts, weights

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.name, "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        """Nothing beyond :meth:`state_dict` (replicated)."""

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Nothing beyond :meth:`load_state_dict`."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_deepspeed_config(path: str | os.PathLike, lr: float, device: torch.device) -> dict[str, Any]:
    """Read the JSON config; ``em.lr`` overrides the optimizer's lr; torch Adam on CPU (FusedAdam needs CUDA).

    ``train_batch_size`` is dropped (DeepSpeed derives it from micro batch x accumulation x world size).
    """
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"em.deepspeed_config: file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"em.deepspeed_config: {path} is not valid JSON (line {err.lineno})") from None
    if not isinstance(config, dict):
        raise UserError(f"em.deepspeed_config: {path} must hold a JSON object")
    config.pop("train_batch_size", None)
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    optimizer = config.get("optimizer")
    if optimizer is not None:
        params = optimizer.setdefault("params", {})
        params["lr"] = lr
        if device.type != "cuda":
            params["torch_adam"] = True
    return config


def _skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    That op only speeds up CPU (inference) all-reduces; gloo is plenty for a [K, C] head. Compiling it
    needs a C++ toolchain, takes minutes on a fresh machine, and concurrent jobs sharing
    ~/.cache/torch_extensions were seen rebuilding it for every launch. DeepSpeed looks the op up in its
    cached ``deepspeed.ops.__compatible_ops__`` table before building; marking it incompatible there
    makes DeepSpeed fall back to torch.distributed. A no-op if the table's layout changes.
    """
    try:
        import deepspeed.ops as ds_ops

        table = ds_ops.__compatible_ops__
    except Exception:  # noqa: BLE001 - any failure just leaves DeepSpeed's default behaviour
        return
    if isinstance(table, dict):
        table["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """``deepspeed.initialize(model=head, config=...)``; DeepSpeed all-reduces the head's gradients.

    Checkpoints: :meth:`state_dict` holds the head weights, plus the optimizer state when it is a plain
    replicated torch optimizer (ZeRO stage 0). For ZeRO >= 1 the optimizer state is partitioned across
    ranks: call :meth:`save_checkpoint`/:meth:`load_checkpoint` (DeepSpeed's own format, tag ``head``) on
    every rank; :meth:`load_state_dict` alone then restores only the weights.
    """

    name = "deepspeed"

    def __init__(self, head: PrototypeHead, em_cfg: Any, env: DistEnv):
        try:
            import deepspeed
        except ImportError:
            raise UserError("em.engine=deepspeed but DeepSpeed is not installed (pip install deepspeed)") from None
        if env.device.type != "cuda":
            _skip_deepspeed_shm_op()
        if not torch.distributed.is_initialized():
            # Single process: DeepSpeed wants a process group; give it a private one-rank group.
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            backend = "nccl" if env.device.type == "cuda" else "gloo"
            deepspeed.init_distributed(dist_backend=backend)
        config = load_deepspeed_config(em_cfg.deepspeed_config, em_cfg.lr, env.device)
        optimizer = None
        if "optimizer" not in config:
            optimizer = torch.optim.Adam(head.parameters(), lr=em_cfg.lr)
        with distributed.guard_collective("deepspeed init"):
            engine, engine_optimizer, _, _ = deepspeed.initialize(
                model=head, model_parameters=list(head.parameters()), optimizer=optimizer, config=config
            )
        self.head = head
        self.engine = engine
        self.optimizer = engine_optimizer
        self.zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))

    def step(
        self, features: torch.Tensor, labels: torch.Tensor, gamma: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with distributed.guard_collective("deepspeed step"):
            loss, counts, weights = _loss(self.engine, features, labels, gamma)
            self.engine.backward(loss)
            self.engine.step()
        return loss.detach(), counts, weights

    @property
    def sharded(self) -> bool:
        """Whether :meth:`save_checkpoint` holds state that :meth:`state_dict` lacks (ZeRO >= 1)."""
        return self._replicated_optimizer() is None

    def _replicated_optimizer(self) -> torch.optim.Optimizer | None:
        return self.optimizer if self.zero_stage == 0 and isinstance(self.optimizer, torch.optim.Optimizer) else None

    def state_dict(self) -> dict[str, Any]:
        optimizer = self._replicated_optimizer()
        return {
            "engine": self.name,
            "head": self.head.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        optimizer = self._replicated_optimizer()
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        refresh = getattr(self.optimizer, "refresh_fp32_params", None)
        if self.zero_stage > 0 and callable(refresh):
            refresh()  # ZeRO keeps its own fp32 master copy of the weights

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        with distributed.guard_collective("deepspeed save_checkpoint"):
            self.engine.save_checkpoint(str(directory), tag="head")

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        if not (Path(directory) / "head").is_dir():
            raise UserError(f"DeepSpeed checkpoint not found: {Path(directory) / 'head'}")
        with distributed.guard_collective("deepspeed load_checkpoint"):
            path, _ = self.engine.load_checkpoint(str(directory), tag="head")
        if path is None:
            raise UserError(f"DeepSpeed could not load its checkpoint from {directory}")


def make_head_engine(head: PrototypeHead, em_cfg: Any, env: DistEnv) -> HeadEngine:
    """``em.engine``: ``ddp`` (Adam, DDP over the head when world > 1) or ``deepspeed``."""
    head.to(env.device)
    if em_cfg.engine == "deepspeed":
        return DeepSpeedEngine(head, em_cfg, env)
    if em_cfg.engine == "ddp":
        return DDPEngine(head, em_cfg.lr, env)
    raise UserError(f"config key 'em.engine': must be 'ddp' or 'deepspeed', got {em_cfg.engine!r}")


# ------------------------------------------------------------------------------------------ orchestration

_SHARDED_SUBDIR = "deepspeed"


class _ShardedWriter:
    """Collective checkpoint writer for engines with sharded state (DeepSpeed ZeRO >= 1).

    Called on EVERY rank; rank 0's directory is shared with all (ranks may pass None), then each rank writes
    its shard into ``<directory>/deepspeed``. Fits ``checkpoint.save_checkpoint(all_ranks_writer=)``
    and the "rank 0 passes the folder, the others None" protocol alike.
    """

    all_ranks = True

    def __init__(self, engine: HeadEngine):
        self.engine = engine

    def __call__(self, directory: str | os.PathLike | None) -> None:
        paths = distributed.all_gather_object(None if directory is None else str(directory))
        if paths[0] is None:
            raise UserError("rank 0 gave no checkpoint directory for the DeepSpeed shards")
        self.engine.save_checkpoint(Path(paths[0]) / _SHARDED_SUBDIR)


class GradientEngine:
    """`gradient` mode: theta_R (head + optimizer behind DDP or DeepSpeed) and theta_M (momentum prototypes).

    Per training step (all ranks)::

        teacher = engine.teacher_prototypes()      # theta_M: pseudo labels on the clean view
        loss, counts = engine.step(student_features, pseudo_labels)
        tracker.log_metrics(engine.last_metrics)   # focal-weight spread and head gains of that step
    """

    def __init__(
        self, prototypes: torch.Tensor, em_cfg: Any, env: DistEnv | None = None, device: torch.device | None = None
    ):
        env = env if env is not None else distributed.current_env()
        if device is not None and torch.device(device) != env.device:
            env = dataclasses.replace(env, device=torch.device(device))
        prototypes = prototypes.detach().to(env.device, torch.float32)
        self.engine = make_head_engine(PrototypeHead(prototypes), em_cfg, env)
        self.momentum = MomentumPrototypes(prototypes, em_cfg.ema_every, em_cfg.ema_max)
        self.gamma = float(em_cfg.focal_gamma)
        self.last_ema_decay: float | None = None
        self.last_metrics: dict[str, float] = {}

    @property
    def head(self) -> PrototypeHead:
        return self.engine.head

    def teacher_prototypes(self) -> torch.Tensor:
        """theta_M unit rows ``[K, C]``: pseudo labels and predictions."""
        return self.momentum.prototypes

    def running_prototypes(self) -> torch.Tensor:
        """theta_R unit rows ``[K, C]``."""
        return self.engine.head.prototypes()

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
        """One optimizer step of theta_R, then the EMA of theta_M (collective).

        Args:
            features: ``[B, C, h, w]`` features of the view the student sees (the photometric view).
            labels: ``[B, H, W]`` pseudo labels (255 = ignore) made with theta_M on the clean view; the
                logits are upsampled bilinearly to ``H x W``.
        Returns:
            (loss as a float, global pseudo-label counts per class ``[K]`` int64). The step's focal
            weights and head gains are left in :attr:`last_metrics` (see :func:`step_metrics`).
        """
        loss, counts, weights = self.engine.step(features, labels, self.gamma)
        self.last_ema_decay = self.momentum.step(self.engine.head.weight)
        self.last_metrics = step_metrics(weights, self.engine.head.gain)
        return float(loss), counts

    def state_dict(self) -> dict[str, Any]:
        """Replicated state (rank 0 may write it); see :meth:`checkpoint_parts` for sharded engines."""
        return {
            "engine": self.engine.state_dict(),
            "momentum": self.momentum.state_dict(),
            "sharded_subdir": _SHARDED_SUBDIR if self.engine.sharded else "",
        }

    def checkpoint_parts(self) -> tuple[dict[str, Any], _ShardedWriter | None]:
        """``(state_dict(), writer)``: ``writer`` is None unless the engine has sharded state; then call
        ``writer(folder)`` on rank 0 and ``writer(folder or None)`` on every other rank (collective)."""
        return self.state_dict(), (_ShardedWriter(self.engine) if self.engine.sharded else None)

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: str | os.PathLike | None = None) -> None:
        """Restore; with a sharded engine also read ``<checkpoint_dir>/deepspeed`` (collective).

        A checkpoint of the former cosine head (no ``gain``) is refused with a one-line UserError: its Adam
        state and its trajectory belong to another head, so resuming it would silently mix two methods.
        """
        if "gain" not in state["engine"]["head"]:
            raise UserError(
                "checkpoint's gradient-mode head has no 'gain': it was saved by the former cosine head and cannot "
                "resume with the weight-normalised head; start a new train.output_dir or set checkpoint.resume=false"
            )
        self.engine.load_state_dict(state["engine"])
        self.momentum.load_state_dict(state["momentum"])
        subdir = state.get("sharded_subdir", "")
        if subdir and self.engine.sharded:
            if checkpoint_dir is None:
                raise UserError("this checkpoint keeps DeepSpeed shards in a folder; pass its checkpoint directory")
            self.load_checkpoint(Path(checkpoint_dir) / subdir)

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        """Collective: the engine's own checkpoint (DeepSpeed format) into ``directory``; no-op for DDP."""
        self.engine.save_checkpoint(directory)

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        self.engine.load_checkpoint(directory)


def step_metrics(focal_weights: torch.Tensor, gains: torch.Tensor) -> dict[str, float]:
    """Spread of the focal class weights ``[K]`` (min, max, population std) and the range of the head's
    gains ``[K]``, as floats for the tracker. Weights that barely differ mean the focal weighting is idle."""
    weights = focal_weights.detach().double().cpu()
    gains = gains.detach().double().cpu()
    return {
        "em/focal_weight_min": float(weights.min()),
        "em/focal_weight_max": float(weights.max()),
        "em/focal_weight_std": float(weights.std(correction=0)),
        "em/head_gain_min": float(gains.min()),
        "em/head_gain_max": float(gains.max()),
    }


def make_engine(
    prototypes: torch.Tensor, em_cfg: Any, env: DistEnv | None = None, device: torch.device | None = None
) -> GradientEngine:
    """The `gradient` M-step engine, starting from ``prototypes`` ``[K, C]`` (theta_R = theta_M = them)."""
    return GradientEngine(prototypes, em_cfg, env, device)
