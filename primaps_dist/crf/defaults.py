"""The dense-CRF default parameters, in one place.

:data:`REFERENCE` holds the PriMaPs reference CRF parameters (the values the reference passes to
pydensecrf). :func:`primaps_dist.crf.dense_crf`, :func:`primaps_dist.crf.make_crf` and the config section
:class:`primaps_dist.config.CRFConfig` all take their defaults from here, so a default changed here
changes everywhere. The one intended difference: the config's ``downsample`` is
:data:`CONFIG_DOWNSAMPLE` (a coarse grid for pseudo labels), the functions' is ``REFERENCE.downsample``
(1, full resolution like the reference). Plain data, no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CONFIG_DOWNSAMPLE", "CRFDefaults", "REFERENCE"]


@dataclass(frozen=True)
class CRFDefaults:
    """Default CRF parameters (meaning of each: :func:`primaps_dist.crf.dense_crf`)."""

    backend: str = "torch"
    iterations: int = 10  # mean-field steps
    gaussian_sxy: float = 1.0  # spatial kernel width, pixels
    gaussian_weight: float = 3.0  # spatial kernel Potts weight
    bilateral_sxy: float = 67.0  # appearance kernel spatial width, pixels
    bilateral_srgb: float = 3.0  # appearance kernel colour width, intensity levels 0..255
    bilateral_weight: float = 4.0  # appearance kernel Potts weight
    downsample: int = 1  # torch backend: coarse-grid factor (1 = every update at full resolution)


REFERENCE = CRFDefaults()

# ``crf.downsample``'s default: pseudo labels of 320 px at stride 8 -> a grid about twice the feature grid
# (trade-off measured in README, "Results", and docs/quality.md).
CONFIG_DOWNSAMPLE = 4
