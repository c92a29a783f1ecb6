"""Label-free health diagnostics of the PriMaPs-EM stage: what to log, and when to warn.

A run without labels cannot report mIoU, but its pseudo labels tell whether it is healthy.
:class:`DiagnosticsWindow` sums the per-batch :class:`~primaps_dist.pseudo_labels.ProposalStats` of a
logging window on the device (no host sync) and turns them into metrics once per logging step:

=========================== =================================================================================
``proposals_per_image``     mean PriMaPs proposals per image (also ``_min`` / ``_max`` over the window)
``proposal_size_cells``     mean proposal size in feature cells, before the 3x3 median filter
``proposal_cells_kept``     fraction of the proposals' feature cells still labelled after the median filter
``coverage_pre_crf``        fraction of label pixels that a proposal labels before the CRF
``coverage_post_crf``       the same after the CRF: the fraction of pixels with a pseudo label
=========================== =================================================================================

(``class_usage_entropy`` is logged by the M-step: the normalised entropy of the all-reduced per-class
pseudo-label counts of the step; 1 = all K classes used equally, 0 = one class.)

:class:`HealthMonitor` turns them into at most one warning line per problem and run, on rank 0.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch

from primaps_dist.pseudo_labels import ProposalStats

log = logging.getLogger("primaps_dist.diagnostics")

METRIC_KEYS = (
    "proposals_per_image",
    "proposals_per_image_min",
    "proposals_per_image_max",
    "proposal_size_cells",
    "proposal_cells_kept",
    "coverage_pre_crf",
    "coverage_post_crf",
)


class DiagnosticsWindow:
    """Accumulates :class:`ProposalStats` over a logging window; :meth:`pop` reads them back once."""

    def __init__(self) -> None:
        self._images = 0  # a host count: a scalar copied to the GPU would synchronise
        self._sums: torch.Tensor | None = None  # [5] float64: proposals, cells, kept cells, coverage pre, post
        self._extremes: torch.Tensor | None = None  # [2] int64 (min, max) proposals per image

    def add(self, stats: ProposalStats) -> None:
        """Add one batch (device tensor arithmetic only)."""
        if stats.proposals.numel() == 0:
            return
        self._images += stats.proposals.numel()
        sums = torch.stack([
            stats.proposals.sum().to(torch.float64),
            stats.proposal_cells.sum().to(torch.float64),
            stats.kept_cells.sum().to(torch.float64),
            stats.coverage_pre_crf.sum().to(torch.float64),
            stats.coverage_post_crf.sum().to(torch.float64),
        ])
        extremes = torch.stack([stats.proposals.min(), stats.proposals.max()])
        if self._sums is None:
            self._sums, self._extremes = sums, extremes
        else:
            self._sums = self._sums + sums
            self._extremes = torch.stack([
                torch.minimum(self._extremes[0], extremes[0]), torch.maximum(self._extremes[1], extremes[1])
            ])

    def pop(self) -> dict[str, float]:
        """The window's metrics (see the module docstring) as floats, and a fresh window; {} when empty."""
        if self._sums is None:
            return {}
        images = self._images
        proposals, cells, kept, pre, post = self._sums.tolist()
        low, high = self._extremes.tolist()
        self._images, self._sums, self._extremes = 0, None, None
        return {
            "proposals_per_image": proposals / images,
            "proposals_per_image_min": float(low),
            "proposals_per_image_max": float(high),
            # A window without a single proposal has no size; 0 reads as "nothing", and warns.
            "proposal_size_cells": cells / proposals if proposals else 0.0,
            # Post-processing can also fill a hole inside a proposal, so this can slightly exceed 1.
            "proposal_cells_kept": kept / cells if cells else 0.0,
            "coverage_pre_crf": pre / images,
            "coverage_post_crf": post / images,
        }


class HealthMonitor:
    """One ``logging.warning`` line per problem and run when the pseudo labels look broken.

    Problems and thresholds (checked on the window's metrics of :class:`DiagnosticsWindow`):

    * **Proposals too small for the 3x3 median filter** (only with ``proposals.median_filter`` on):
      ``proposal_cells_kept < 0.5``, i.e. the filter erases most of the cells the PriMaPs loop covered.
      The filter keeps a cell only where at least 5 of the 9 cells of its window belong to the same
      proposal: a proposal of fewer than 5 cells always vanishes, a compact one smaller than the window
      loses most of its cells, and so does a large but speckled one. The kept fraction measures this
      directly, whatever the shape; the mean size alone does not (a few large proposals hide many tiny
      ones, and speckled proposals are large). Measured on 32 demo mosaics (EfficientNet-Lite0, 192 px
      crops, max_masks 16), kept fraction / mean size: stride 8 (layers [2, 3], the demo) 0.71 / 34 cells,
      0.70 with max_masks 64, 0.80 with threshold 0.3; stride 16 (layer [3], the setting docs/quality.md
      shows gains little) 0.46 / 7.8 cells, 0.42 with max_masks 64, 0.61 with threshold 0.3 (which
      restores most of the gain); layer [2] alone (speckled) 0.41 / 35 cells. 0.5 separates them with a
      margin of ~0.1 on either side.
    * **Coverage collapse**: ``coverage_post_crf < 0.25``: fewer than a quarter of the pixels get a pseudo
      label, so the M-step sees little beyond region cores, where K-means is already right. The same
      measurement: 0.69 at stride 8 (0.61 at stride 16 with threshold 0.3), 0.21 to 0.28 at stride 16 with
      the paper's threshold; a quarter is about a third of the healthy value.

    Only the rank that tracks (rank 0) should call :meth:`check`; the values are its own batches.
    """

    MIN_CELLS_KEPT = 0.5
    MIN_COVERAGE = 0.25

    def __init__(self, median_filter: bool = True) -> None:
        self.median_filter = median_filter
        self.warned: set[str] = set()

    def problems(self, metrics: Mapping[str, float]) -> dict[str, str]:
        """``{problem name: one-line description}`` of the problems these metrics show ({} without them)."""
        found: dict[str, str] = {}
        if "proposal_cells_kept" not in metrics:
            return found
        kept, size = metrics["proposal_cells_kept"], metrics["proposal_size_cells"]
        if self.median_filter and kept < self.MIN_CELLS_KEPT:
            found["small_proposals"] = (
                f"proposals too small for the 3x3 median filter: it keeps {100 * kept:.0f} % of their cells "
                f"(want >= {100 * self.MIN_CELLS_KEPT:.0f} %; mean proposal size {size:.1f} feature cells); "
                "use a finer feature stride (backbone.layers), a lower proposals.threshold or "
                "proposals.median_filter=false (docs/quality.md)"
            )
        coverage = metrics["coverage_post_crf"]
        if coverage < self.MIN_COVERAGE:
            found["coverage_collapse"] = (
                f"pseudo-label coverage collapsed: {100 * coverage:.0f} % of the pixels labelled after the CRF "
                f"({100 * metrics['coverage_pre_crf']:.0f} % before it; want >= {100 * self.MIN_COVERAGE:.0f} %); "
                "check proposal_size_cells / proposal_cells_kept, proposals.threshold and the crf settings"
            )
        return found

    def check(self, metrics: Mapping[str, float], step: int) -> list[str]:
        """Warn about every problem not warned about before in this run; returns the new warning lines."""
        lines = []
        for name, text in self.problems(metrics).items():
            if name not in self.warned:
                self.warned.add(name)
                lines.append(f"step {step}: {text}")
                log.warning("%s", lines[-1])
        return lines
