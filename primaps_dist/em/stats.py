"""All-reduced sufficient statistics: the `stats` M-step of PriMaPs-EM and of spherical K-means.

One step on every rank (docs/method.md, "4. The prototype update"):

1. :func:`batch_stats` turns this rank's pixel features ``[N, C]`` and labels ``[N]`` (``IGNORE_INDEX`` = ignore) into
   one packed float64 tensor ``[K, C+1]``: columns ``0..C-1`` = ``S_k`` (sum of L2-normalised features
   with label k), column ``C`` = ``N_k`` (their count).
2. ONE ``all_reduce(SUM)`` of that tensor (:func:`~primaps_dist.distributed.all_reduce_sum`). Sums and
   counts are reduced, never means, so W ranks with batch B give the statistics of 1 rank with batch W*B.
   The logged objective, the mean cosine similarity of the labelled features to their class prototype,
   needs no extra communication: with ``mu_k`` fixed during the step, the sum of ``cos(f_i, mu_k)`` over
   the pixels of class k is ``<S_k, mu_k>``, computed from the reduced ``S``.
3. :meth:`PrototypeState.update` does identical float64 arithmetic on every rank and branches only on
   reduced values, so the prototypes stay bitwise identical across ranks (same device type assumed).

Moving averages, with momentum ``b``::

    M_k <- b * M_k + (1 - b) * S_k        W_k <- b * W_k + (1 - b) * N_k        mu_k = M_k / ||M_k||

(``M_k / W_k`` has the direction of ``M_k``; ``W_k`` is kept as the class's effective pixel count.)
Decisions:

* ``M`` and ``W`` start at zero, so the first update of a class gives ``mu_k = normalise(S_k / N_k)``:
  the zero start makes ``M_k / W_k`` an exactly weighted mean of the batch means (no start-up bias),
  whatever the momentum. Before its first observation a class keeps its initial (PCA) prototype.
* A class with ``N_k = 0`` in the reduced batch keeps ``mu_k`` and its ``M_k``, ``W_k`` unchanged (they
  are not decayed): the average advances per observation of the class, and long absences cannot
  underflow ``M``/``W`` to subnormal numbers.
* A class whose ``M_k`` has (numerically) zero length, i.e. its features cancel out, keeps ``mu_k``.
* ``momentum = 0`` is a plain Lloyd step on the batch: ``mu_k = normalise(S_k)``.

No step reads a device value on the host: counts are added with ``index_add_`` (``bincount`` reads the
maximum label on a GPU), the objective and counts stay device tensors until a logging step reads them, and
callers whose labels are valid by construction (K-means, the trainer's pseudo labels) skip the range check
with ``check_labels=False``.

``index_add_`` on CUDA uses atomics, so per-rank sums may differ in the last bits between runs on GPU;
ranks still agree bitwise because they all use the reduced tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from primaps_dist import distributed
from primaps_dist.labels import IGNORE_INDEX

__all__ = [
    "StepResult",
    "PrototypeState",
    "as_pixel_rows",
    "batch_stats",
    "normalise_rows",
    "stats_step",
]

# Rows per chunk when converting features to float64, to bound the temporary memory (64 Ki x C x 8 bytes).
_CHUNK_ROWS = 65536


def normalise_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise the last dimension (zero rows stay zero)."""
    return F.normalize(x, dim=-1, eps=eps)


def as_pixel_rows(
    features: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Accept ``[N, C]`` (+ ``[N]``) or a feature map ``[B, C, H, W]`` (+ ``[B, H, W]``); return rows ``[N, C]``.

    Labels must have the feature map's spatial size (upsample features or downsample labels first).
    """
    if features.dim() == 4:
        batch, channels, height, width = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
        if labels is not None:
            if tuple(labels.shape) != (batch, height, width):
                raise ValueError(
                    f"labels have shape {tuple(labels.shape)} but the feature map needs {(batch, height, width)}"
                )
            labels = labels.reshape(-1)
        return rows, labels
    if features.dim() != 2:
        raise ValueError(f"features must be [N, C] or [B, C, H, W], got shape {tuple(features.shape)}")
    if labels is not None and tuple(labels.shape) != (features.shape[0],):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but features have {features.shape[0]} rows")
    return features, labels


def _check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"label {value} is outside [0, {num_classes}) and is not the ignore id {ignore_index}")


def batch_stats(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    check_labels: bool = True,
) -> torch.Tensor:
    """Per-class sums of L2-normalised features and counts of this rank's batch (no communication).

    Args:
        features: ``[N, C]`` or ``[B, C, H, W]``, any float dtype; normalised per row here in float64.
        labels: ``[N]`` or ``[B, H, W]`` integer class ids in ``[0, K)``; ``ignore_index`` rows are skipped.
        num_classes: K.
        check_labels: raise ValueError on a label outside ``[0, K)`` that is not ``ignore_index``; this reads
            a device value on the host (one sync on a GPU), so callers whose labels are valid by
            construction pass False.
    Returns:
        float64 ``[K, C+1]``: ``S`` (columns ``0..C-1``) and ``N`` (column ``C``), on the features' device.
    """
    rows, labels = as_pixel_rows(features, labels)
    if check_labels:
        _check_labels(labels, num_classes, ignore_index)
    count, channels = rows.shape
    device = rows.device
    labels = labels.to(device)
    # Ignored rows go to an extra dummy class K that is dropped at the end (no boolean copy of the features).
    index = labels.to(torch.long).masked_fill(labels == ignore_index, num_classes)
    sums = torch.zeros(num_classes + 1, channels, dtype=torch.float64, device=device)
    for start in range(0, count, _CHUNK_ROWS):
        chunk = normalise_rows(rows[start : start + _CHUNK_ROWS].to(torch.float64))
        sums.index_add_(0, index[start : start + _CHUNK_ROWS], chunk)
    # Exact for counts below 2**53, whatever the order of the additions; no host read, unlike bincount on CUDA.
    counts = torch.zeros(num_classes + 1, dtype=torch.float64, device=device)
    counts.index_add_(0, index, torch.ones(count, dtype=torch.float64, device=device))
    return torch.cat([sums[:num_classes], counts[:num_classes, None]], dim=1)


@dataclass
class StepResult:
    """What one statistics update reports (global values, identical on every rank).

    ``objective``: 0-dim float64, mean cosine similarity of the labelled pixel features to their class
    prototype *before* the update (NaN when no pixel was labelled); ``counts``: ``[K]`` int64 labelled pixels
    per class; ``labelled``: 0-dim int64, their total; ``updated``: ``[K]`` bool, classes whose prototype
    was recomputed. All stay on the prototypes' device: ``float(result.objective)`` reads one back (a host
    sync on a GPU), so the trainer reads them on logging steps only.
    """

    objective: torch.Tensor
    counts: torch.Tensor
    labelled: torch.Tensor
    updated: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        """Python numbers for logging."""
        return {
            "objective": float(self.objective),
            "labelled": float(self.labelled),
            "classes_used": float(int((self.counts > 0).sum())),
        }


class PrototypeState:
    """Prototypes ``mu`` [K, C] float32 (unit rows) and their float64 moving statistics ``M`` [K, C], ``W`` [K].

    ``PrototypeState(K, C)`` starts with zero prototypes (placeholders until :meth:`initialize`, e.g. with
    the PCA directions); :meth:`from_prototypes` builds an initialised state in one go.
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str | None = None):
        if num_classes < 1 or dim < 1:
            raise ValueError(f"need num_classes >= 1 and dim >= 1, got {num_classes} and {dim}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.prototypes = torch.zeros(num_classes, dim, dtype=torch.float32, device=device)
        self.M = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.W = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.step = 0

    @classmethod
    def from_prototypes(cls, prototypes: torch.Tensor) -> "PrototypeState":
        if prototypes.dim() != 2:
            raise ValueError(f"prototypes must be [K, C], got shape {tuple(prototypes.shape)}")
        state = cls(prototypes.shape[0], prototypes.shape[1], prototypes.device)
        state.initialize(prototypes)
        return state

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def dim(self) -> int:
        return self.prototypes.shape[1]

    @property
    def device(self) -> torch.device:
        return self.prototypes.device

    def _checked(self, prototypes: torch.Tensor) -> torch.Tensor:
        if tuple(prototypes.shape) != tuple(self.prototypes.shape):
            raise ValueError(f"prototypes have shape {tuple(prototypes.shape)}, expected {tuple(self.prototypes.shape)}")
        return normalise_rows(prototypes.detach().to(device=self.device, dtype=torch.float32)).clone()

    def initialize(self, prototypes: torch.Tensor) -> None:
        """Start from ``prototypes`` ``[K, C]`` (normalised here): M = W = 0, step = 0."""
        self.prototypes = self._checked(prototypes)
        self.M.zero_()
        self.W.zero_()
        self.step = 0

    def set_prototypes(self, prototypes: torch.Tensor) -> None:
        """Replace ``mu`` only (e.g. mirror the gradient mode's momentum prototypes); M, W untouched."""
        self.prototypes = self._checked(prototypes)

    def to(self, device: torch.device | str) -> "PrototypeState":
        self.prototypes = self.prototypes.to(device)
        self.M = self.M.to(device)
        self.W = self.W.to(device)
        return self

    def update(self, reduced: torch.Tensor, momentum: float) -> StepResult:
        """Apply one moving-average step from the REDUCED packed statistics ``[K, C+1]`` (see module doc).

        Identical on every rank given the same reduced tensor; no host sync (the result holds device tensors).
        """
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        num_classes, channels = self.num_classes, self.dim
        if tuple(reduced.shape) != (num_classes, channels + 1):
            expected = (num_classes, channels + 1)
            raise ValueError(f"packed statistics have shape {tuple(reduced.shape)}, expected {expected}")
        reduced = reduced.to(device=self.device, dtype=torch.float64)
        sums, counts = reduced[:, :channels], reduced[:, channels]
        labelled = counts.sum()
        # sum_i cos(f_i, mu_label_i) = sum_k <S_k, mu_k>, with the prototypes before this update.
        objective = (sums * self.prototypes.to(torch.float64)).sum() / labelled  # NaN when nothing labelled
        observed = counts > 0
        self.M = torch.where(observed[:, None], momentum * self.M + (1.0 - momentum) * sums, self.M)
        self.W = torch.where(observed, momentum * self.W + (1.0 - momentum) * counts, self.W)
        norms = self.M.norm(dim=1)
        # Features that (nearly) cancel out give no direction: keep the old prototype then.
        usable = observed & (norms > 1e-9 * self.W)
        directions = (self.M / norms.clamp_min(1e-300)[:, None]).to(torch.float32)
        self.prototypes = torch.where(usable[:, None], directions, self.prototypes)
        self.step += 1
        return StepResult(
            objective=objective,
            counts=counts.round().to(torch.int64),
            labelled=labelled.round().to(torch.int64),
            updated=usable,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (``torch.load(weights_only=True)`` works)."""
        return {
            "prototypes": self.prototypes.clone(),
            "M": self.M.clone(),
            "W": self.W.clone(),
            "step": torch.tensor(self.step, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = {"prototypes", "M", "W", "step"} - set(state)
        if missing:
            raise ValueError(f"prototype state lacks {', '.join(sorted(missing))}")
        expected = {"prototypes": tuple(self.prototypes.shape), "M": tuple(self.M.shape), "W": tuple(self.W.shape)}
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"prototype state '{key}' has shape {tuple(state[key].shape)}, expected {shape}")
        self.prototypes = state["prototypes"].to(device=self.device, dtype=torch.float32).clone()
        self.M = state["M"].to(device=self.device, dtype=torch.float64).clone()
        self.W = state["W"].to(device=self.device, dtype=torch.float64).clone()
        self.step = int(state["step"])


def stats_step(
    state: PrototypeState,
    features: torch.Tensor,
    labels: torch.Tensor,
    momentum: float,
    ignore_index: int = IGNORE_INDEX,
    check_labels: bool = True,
) -> StepResult:
    """One all-reduced statistics step: batch_stats -> ONE all_reduce_sum -> :meth:`PrototypeState.update`.

    Every rank must call it (with its own batch, possibly without any labelled pixel) equally often.
    ``features`` ``[N, C]``/``[B, C, H, W]``, ``labels`` ``[N]``/``[B, H, W]`` with ``IGNORE_INDEX`` = ignore;
    ``check_labels=False`` skips the label range check (see :func:`batch_stats`).
    """
    packed = batch_stats(features, labels, state.num_classes, ignore_index, check_labels)
    distributed.all_reduce_sum(packed)
    return state.update(packed, momentum)
