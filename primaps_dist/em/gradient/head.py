"""theta_R's head and its focal loss.

* :class:`PrototypeHead` (theta_R): the paper's head, a weight-normalised bias-free 1x1 convolution on the
  UN-normalised features ``f``: ``logit_k = gain_k * <weight_k / ||weight_k||, f>
  = gain_k * ||f|| * cos(weight_k, f)``. ``weight`` ``[K, C]`` is weight norm's direction ``v`` and
  ``gain`` ``[K]`` its ``g``; both are trained; the gain starts at 1 (the reference sets ``weight_g = 1``
  after its PCA / K-means initialisation). The feature norm is the logit scale, so it depends on the
  backbone (measured values: docs/method.md, "The head's logit scale"). The softmax is then peaked and the focal weights ``(1 - p_k)^2`` differ between
  frequent and rare classes. (A cosine head, ``|logit| <= 1``, gives every class a probability near 1/K
  and weights near ``(1 - 1/K)^2`` for all: no focal weighting.) The head is linear in ``f``, so logits
  at feature resolution upsampled bilinearly equal the reference's logits of upsampled features exactly.
  Prototypes (pseudo labels, predictions, evaluation, the ``stats`` mode, checkpoints) are the unit
  directions ``normalise(weight_k)``, predicted by ``argmax_k cos``: the per-pixel ``||f||`` does not
  change the argmax, and ``gain`` is left out on purpose (see
  :class:`~primaps_dist.em.gradient.momentum.MomentumPrototypes`).
* :func:`focal_class_weighted_ce`: cross entropy with class weights ``(1 - mean softmax prob of k)^gamma``
  (detached), ignore id 255, summed over labelled pixels and divided by ALL pixel positions (ignored ones
  included), as in the reference. With equal per-rank batch shapes and weights from the global batch
  (:func:`global_focal_loss`, or ``focal_class_weights(..., sync=True)``) the DDP/DeepSpeed gradient
  average equals the single-process gradient on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from primaps_dist import distributed
from primaps_dist.labels import IGNORE_INDEX

__all__ = [
    "PrototypeHead",
    "focal_class_weights",
    "focal_class_weighted_ce",
    "global_focal_loss",
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
        # A fill on the device, not a copy from the host (a blocking copy waits for the device).
        positions = probs.new_full((1,), float(probs[:, 0].numel()), dtype=torch.float64)
        counts = torch.zeros(num_classes + 1, dtype=torch.float64, device=logits.device)
        if labels is not None:
            # Ignored and out-of-range labels go to the dropped slot K. index_add_ of ones is exact and, unlike
            # bincount or a boolean mask, needs no size from the device.
            flat = labels.reshape(-1).to(logits.device).long()
            flat = flat.masked_fill((flat == ignore_index) | (flat >= num_classes), num_classes)
            counts.index_add_(0, flat, torch.ones(flat.shape, dtype=torch.float64, device=flat.device))
        counts = counts[:num_classes]
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



def global_focal_loss(
    logits: torch.Tensor, labels: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Focal loss of ``logits`` ``[B, K, H, W]`` against ``labels`` ``[B, H, W]`` with class weights of the
    global batch (collective: ONE all-reduce of ``[2K+1]``, every rank must call it).

    Returns the loss (scalar, with autograd), the global label counts ``[K]`` int64 and the focal class
    weights ``[K]`` float32 (identical on every rank).
    """
    mean_prob, counts = _class_statistics(logits, labels, sync=True)
    weights = _weights_from(mean_prob, gamma)
    return focal_class_weighted_ce(logits, labels, gamma, weights=weights), counts, weights
