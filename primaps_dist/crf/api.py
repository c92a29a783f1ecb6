"""Public entry points of the CRF: :func:`dense_crf` (validate, pick a backend), :func:`make_crf` (bind the
parameters) and :func:`crf_from_config` (the one place a ``crf`` config section becomes a CRF step).

Adding a backend: name it in :data:`BACKENDS`, dispatch to it in :func:`dense_crf`, and add its set-up
checks (e.g. an optional import) to :func:`make_crf`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

from primaps_dist.crf.defaults import REFERENCE
from primaps_dist.crf.mean_field import mean_field
from primaps_dist.crf.pydensecrf_backend import dense_crf_pydensecrf, import_pydensecrf

if TYPE_CHECKING:
    from primaps_dist.config import CRFConfig

__all__ = ["BACKENDS", "CrfFn", "crf_from_config", "dense_crf", "make_crf"]

BACKENDS = ("torch", "pydensecrf")
CrfFn = Callable[[Tensor, Tensor], Tensor]  # crf_fn(logits [B, L, H, W], images [B, 3, H, W] 0..255) -> probs


def _check_inputs(logits: Tensor, images: Tensor, iterations: int, params: dict[str, float]) -> None:
    if not isinstance(logits, Tensor) or not isinstance(images, Tensor):
        raise ValueError("dense_crf: logits and images must be torch tensors")
    if logits.ndim != 4:
        raise ValueError(f"dense_crf: logits must be [B, L, H, W], got shape {tuple(logits.shape)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"dense_crf: images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    batch, labels, height, width = logits.shape
    if batch < 1 or labels < 1 or height < 1 or width < 1:
        raise ValueError(f"dense_crf: logits must be non-empty, got shape {tuple(logits.shape)}")
    if (images.shape[0], images.shape[2], images.shape[3]) != (batch, height, width):
        raise ValueError(
            f"dense_crf: images {tuple(images.shape)} do not match logits {tuple(logits.shape)} "
            "(need the same B, H, W)"
        )
    if logits.dtype != torch.float32:
        raise ValueError(f"dense_crf: logits must be float32, got {logits.dtype}")
    if images.dtype != torch.float32:
        raise ValueError(
            f"dense_crf: images must be float32 RGB in 0..255, got {images.dtype} "
            "(convert explicitly, e.g. images.float() for uint8)"
        )
    if images.device != logits.device:
        raise ValueError(f"dense_crf: images on {images.device} but logits on {logits.device}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"dense_crf: iterations must be an int >= 0, got {iterations!r}")
    for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
        if not (math.isfinite(params[name]) and params[name] > 0):
            raise ValueError(f"dense_crf: {name} must be a finite number > 0, got {params[name]!r}")
    for name in ("gaussian_weight", "bilateral_weight"):
        if not (math.isfinite(params[name]) and params[name] >= 0):
            raise ValueError(f"dense_crf: {name} must be a finite number >= 0, got {params[name]!r}")
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise ValueError("dense_crf: logits contain NaN or +inf")
    if not (~torch.isneginf(logits)).any(dim=1).all():
        raise ValueError("dense_crf: every pixel needs at least one finite logit (all labels are -inf somewhere)")
    if not torch.isfinite(images).all():
        raise ValueError("dense_crf: images contain NaN or inf")


def _check_downsample(caller: str, downsample: int) -> None:
    if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
        raise ValueError(f"{caller}: downsample must be an int >= 1, got {downsample!r}")


def dense_crf(
    logits: Tensor,
    images: Tensor,
    *,
    iterations: int = REFERENCE.iterations,
    gaussian_sxy: float = REFERENCE.gaussian_sxy,
    gaussian_weight: float = REFERENCE.gaussian_weight,
    bilateral_sxy: float = REFERENCE.bilateral_sxy,
    bilateral_srgb: float = REFERENCE.bilateral_srgb,
    bilateral_weight: float = REFERENCE.bilateral_weight,
    backend: str = REFERENCE.backend,
    downsample: int = REFERENCE.downsample,
) -> Tensor:
    """Refine per-pixel label scores with a fully connected CRF (mean-field inference).

    Args:
        logits: ``[B, L, H, W]`` float32 log-probabilities or unnormalised logits. ``-inf`` marks a label
            as unused at that pixel; it gets probability exactly 0 (see the package docstring, :mod:`primaps_dist.crf`).
        images: ``[B, 3, H, W]`` float32 RGB in 0..255 (not normalised), same device, B, H and W.
            Other dtypes are rejected: convert uint8 with ``images.float()``; float64 with ``.float()``.
        iterations: mean-field steps (0 returns the unary softmax, as pydensecrf does).
            Every default is the reference parameter from :data:`primaps_dist.crf.defaults.REFERENCE`.
        gaussian_sxy, gaussian_weight: spatial smoothness kernel width (pixels) and Potts weight.
        bilateral_sxy, bilateral_srgb, bilateral_weight: appearance kernel widths (pixels, intensity
            levels) and Potts weight.
        backend: ``"torch"`` (batched, CPU or CUDA) or ``"pydensecrf"`` (reference, CPU, per image).
        downsample: torch backend only. 1 (default) runs every update at full resolution; f > 1 runs all
            but the last update on an f-times coarser grid and the last one at full resolution (see
            :func:`primaps_dist.crf.mean_field.mean_field`): f^2 times fewer points for the lattice and
            those updates. An edge inside a cell may be missed by up to f - 1 pixels. Measured speed and
            agreement with pydensecrf per factor: README, "Results".

    Returns:
        ``[B, L, H, W]`` float32 probabilities (sum to 1 over L) on the device of ``logits``; the torch
        backend returns them in ``torch.channels_last`` memory format (its working layout; no copy).
        Channels-last ``logits`` (e.g. ``upsample_logits(..., memory_format=torch.channels_last)``) save a
        transposing copy on the way in.
    """
    params = dict(
        gaussian_sxy=float(gaussian_sxy),
        gaussian_weight=float(gaussian_weight),
        bilateral_sxy=float(bilateral_sxy),
        bilateral_srgb=float(bilateral_srgb),
        bilateral_weight=float(bilateral_weight),
    )
    if backend not in BACKENDS:
        raise ValueError(f"dense_crf: unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    _check_downsample("dense_crf", downsample)
    if backend == "pydensecrf" and downsample != 1:
        raise ValueError(f"dense_crf: downsample={downsample} needs the torch backend (pydensecrf runs at full resolution)")
    _check_inputs(logits, images, iterations, params)
    if backend == "pydensecrf":
        return dense_crf_pydensecrf(logits, images, iterations, **params)
    with torch.no_grad():
        return mean_field(logits.detach(), images.detach(), iterations, **params, downsample=downsample)


def make_crf(
    backend: str = REFERENCE.backend,
    iterations: int = REFERENCE.iterations,
    gaussian_sxy: float = REFERENCE.gaussian_sxy,
    gaussian_weight: float = REFERENCE.gaussian_weight,
    bilateral_sxy: float = REFERENCE.bilateral_sxy,
    bilateral_srgb: float = REFERENCE.bilateral_srgb,
    bilateral_weight: float = REFERENCE.bilateral_weight,
    downsample: int = REFERENCE.downsample,
) -> CrfFn:
    """Bind the CRF parameters (the fields of ``config.CRFConfig``) into ``crf_fn(logits, images)``.

    The defaults here are the reference parameters, :data:`primaps_dist.crf.defaults.REFERENCE`
    (``downsample=1``; the config's default is :data:`~primaps_dist.crf.defaults.CONFIG_DOWNSAMPLE`).
    ``downsample`` applies to the torch backend only: with ``"pydensecrf"`` (always full resolution) it
    is not used. A ``"pydensecrf"`` backend that is not installed fails here, at set-up time, with a
    :class:`UserError`. For a config section use :func:`crf_from_config`, which decides what
    ``backend: none`` means for the pipeline; here, where a function is always returned,
    ``backend="none"`` gives ``softmax(logits)`` over labels (no refinement, same output contract).
    """
    if backend == "none":
        return _softmax_only
    if backend not in BACKENDS:
        raise ValueError(f"make_crf: unknown backend {backend!r} (choose from none, {', '.join(BACKENDS)})")
    _check_downsample("make_crf", downsample)
    if backend == "pydensecrf":
        import_pydensecrf()
        downsample = 1  # pydensecrf works at full resolution; the factor is a torch-backend setting
    return functools.partial(
        dense_crf,
        iterations=iterations,
        gaussian_sxy=gaussian_sxy,
        gaussian_weight=gaussian_weight,
        bilateral_sxy=bilateral_sxy,
        bilateral_srgb=bilateral_srgb,
        bilateral_weight=bilateral_weight,
        backend=backend,
        downsample=downsample,
    )


def _softmax_only(logits: Tensor, images: Tensor) -> Tensor:  # noqa: ARG001 - same signature as dense_crf
    """``make_crf(backend="none")``: ``[B, L, H, W]`` logits -> probabilities; ``images`` unused."""
    return torch.softmax(logits, dim=1)


def crf_from_config(
    cfg_crf: "CRFConfig", *, downsample: Optional[int] = None, force: bool = False
) -> Optional[CrfFn]:
    """The CRF step a ``crf`` config section asks for: ``crf_fn(logits, images)``, or None for no step.

    Train (pseudo labels), evaluate (``eval.crf``) and show-proposals all build their CRF here. The one
    rule for ``backend: none``: there is no CRF step, this returns None and the caller skips the step
    (it takes the argmax of the logits it already has; no softmax is computed). ``force=True`` is for a
    caller whose own setting asks for a CRF (``eval.crf: true``): there ``none`` selects the torch
    backend, with the section's parameters.

    Args:
        cfg_crf: a :class:`~primaps_dist.config.CRFConfig`.
        downsample: replaces ``cfg_crf.downsample`` when given (``eval.crf_downsample``); torch only.
        force: never return None (see above).

    Returns:
        ``make_crf(**fields)``: a ``functools.partial`` of :func:`dense_crf` (``logits [B, L, H, W]``
        float32, ``images [B, 3, H, W]`` float32 0..255 -> probabilities ``[B, L, H, W]``), or None.
    """
    fields = dataclasses.asdict(cfg_crf)
    if downsample is not None:
        fields["downsample"] = downsample
    if fields["backend"] == "none":
        if not force:
            return None
        fields["backend"] = "torch"
    return make_crf(**fields)
