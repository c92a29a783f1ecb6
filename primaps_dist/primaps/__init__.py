"""PriMaPs: batched principal mask proposals (docs/method.md, "Principal mask proposals").

One call processes a whole batch of feature maps. On accelerators (and with
``PRIMAPS_DIST_NATIVE=0``) the batch advances one round at a time in torch, and the only Python loops
are over proposal rounds (at most ``max_masks``) and over the iterations of the eigen-solver inside a
round. On the CPU the same rounds run in C++ (``native``), one image at a time.

Per image and round:

1. First principal direction ``v`` of the centred features at the still *free* positions. The
   un-normalised covariance ``A = G_free - S S^T / n_free`` is kept as a running Gram matrix
   ``G_free = sum_free x x^T`` ([B, C, C]) and sum ``S = sum_free x`` ([B, C]); covered positions
   are subtracted (down-dated) once, when they get covered. ``v`` is the top eigenvector of ``A``,
   found by block subspace iteration (``eigen.BLOCK`` vectors, warm-started from the previous
   round's Ritz basis, whose product with ``G`` is carried over through the down-date): a degree-4
   Chebyshev filter on ``A``, one QR, one Rayleigh-Ritz step, repeated until the relative residual
   ``||A v - theta v|| / theta`` drops below ``_RESIDUAL_TOL`` (once in most rounds, twice in the
   rest); it agrees with an exact float64 eigendecomposition and with the reference's
   ``torch.pca_lowrank(q=3, niter=100)`` (see tests). No [B, h*w, h*w] tensor is ever built.
2. **Orientation**: a principal direction has no intrinsic sign, yet the sign decides which end of
   the axis step 3 starts from. ``v`` gets the sign that the published code's
   ``torch.pca_lowrank(q=3, niter=100)`` returns, by replaying that routine's final Rayleigh-Ritz
   step from the top-3 eigenvectors with the same LAPACK calls on the CPU
   (:func:`orientation.reference_orientation`; evidence in docs/method.md). Then ``s = <v, n>`` with
   ``n = f / ||f||``; ``s = 0`` at covered positions.
3. Nearest-neighbour refinement: ``v = n[p]`` at ``p = argmax`` of ``s`` over free positions (first
   one on ties); ``s = <v, n>``, ``s = 0`` at covered positions.
4. ``s[s < threshold * max(s)] = 0``; ``s = s / max(s)`` is the soft proposal.
5. Positions with ``s > 0`` become covered.
6. Stop an image when the covered fraction reaches ``coverage``, when it has ``max_masks``
   proposals, or when a round covers nothing new. The reference keeps the last three coverage
   states and stops when they agree; here every round is a deterministic function of the coverage
   state, so one unchanged round already means that nothing will ever change again. Such an empty
   round adds no proposal (the reference would add an all-zero / NaN mask).

Modules: ``eigen`` (the solver of step 1), ``orientation`` (step 2's sign), ``rounds`` (the loop,
steps 2-6), ``postprocess`` (median filter, background channel, log-probabilities), ``rows`` (row
bookkeeping), ``native`` (on the CPU, the same rounds in C++, one image at a time: same maps, faster;
``PRIMAPS_DIST_NATIVE`` selects it).

Images that are done keep their state while the others continue; finished images leave the working
batch and covered positions leave the stored features (both geometrically), so they stop costing
compute. Post-processing uses that proposals are disjoint: the median-filtered stack has at most one
nonzero channel per position, so ``mask_logits`` never builds the dense [B, M, h, w] stack
(``postprocess_masks`` is the general dense version; both agree to float rounding).

Degenerate inputs: positions whose feature vector is zero can never be covered (``s = 0`` there)
and end up as background; constant features give one proposal covering everything.
"""

from primaps_dist.primaps.postprocess import logits_from_maps, mask_logits, median_filter_3x3, postprocess_masks
from primaps_dist.primaps.rounds import principal_masks, proposal_maps

__all__ = [
    "logits_from_maps",
    "mask_logits",
    "median_filter_3x3",
    "postprocess_masks",
    "principal_masks",
    "proposal_maps",
]
