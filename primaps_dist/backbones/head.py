"""The projection head itself: :class:`ProjectionHead` and the reader of its weight file.

``backbone.head_weights=PATH`` puts a user's trained STEGO / HP-style head, frozen, after the backbone
(:func:`with_projection_head`, called by :func:`~primaps_dist.backbones.build.build_backbone`: the file is read by
:func:`load_projection_head`, the head put after the backbone by :func:`attach_projection_head`, which
:meth:`Segmenter.from_export <primaps_dist.Segmenter.from_export>` also uses for a head rebuilt from an export's
tensors, :func:`projection_head_shaped_like`). The file format
(this project's and STEGO's tensor names) and the command line that checks or creates such files are described
in :mod:`primaps_dist.backbones.projection_head`; that module is kept apart so that ``python -m`` runs it as a
clean ``__main__`` and the builder and the config can import this one without importing the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from primaps_dist.backbones.extractor import FeatureExtractor
from primaps_dist.backbones.weights import load_weights_file
from primaps_dist.errors import ConfigError

HEAD_KEY = "backbone.head_weights"
# Where attach_projection_head puts the head in the FeatureExtractor's state dict (body = Sequential(body, head)).
HEAD_STATE_PREFIX = "body.1."

# Leaf names this project writes, and STEGO's names for the same tensors.
_LEAVES = ("linear.weight", "linear.bias", "nonlinear.0.weight", "nonlinear.0.bias",
           "nonlinear.2.weight", "nonlinear.2.bias")
_ALIASES = {
    "cluster1.0.weight": "linear.weight", "cluster1.0.bias": "linear.bias",
    "cluster2.0.weight": "nonlinear.0.weight", "cluster2.0.bias": "nonlinear.0.bias",
    "cluster2.2.weight": "nonlinear.2.weight", "cluster2.2.bias": "nonlinear.2.bias",
}


class ProjectionHead(nn.Module):
    """``[B, C, h, w] -> [B, D, h, w]``: ``linear(x) + nonlinear(x)`` (1x1 convolutions; no branch if hidden=0)."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 0, bias: bool = True):
        super().__init__()
        if min(in_channels, out_channels) < 1 or hidden_channels < 0:
            raise ValueError(f"bad head sizes: in {in_channels}, out {out_channels}, hidden {hidden_channels}")
        self.in_channels, self.out_channels, self.hidden_channels = in_channels, out_channels, hidden_channels
        self.linear = nn.Conv2d(in_channels, out_channels, 1, bias=bias)
        self.nonlinear: nn.Module | None = None
        if hidden_channels:
            self.nonlinear = nn.Sequential(
                nn.Conv2d(in_channels, hidden_channels, 1, bias=bias),
                nn.ReLU(),
                nn.Conv2d(hidden_channels, out_channels, 1, bias=bias),
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        code = self.linear(features)
        return code if self.nonlinear is None else code + self.nonlinear(features)

    def describe(self) -> str:
        branch = f" + conv-ReLU-conv branch (hidden {self.hidden_channels})" if self.hidden_channels else ""
        return f"projection head {self.in_channels} -> {self.out_channels} channels (linear 1x1{branch})"


def _head_tensors(state_dict: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The head's tensors under this project's leaf names (one common prefix, STEGO names translated)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        for leaf in (*_LEAVES, *_ALIASES):
            if key == leaf or key.endswith("." + leaf):
                prefix = key[: len(key) - len(leaf)]
                found.setdefault(prefix, {})[_ALIASES.get(leaf, leaf)] = value
                break
    heads = {prefix: tensors for prefix, tensors in found.items() if "linear.weight" in tensors}
    if not heads:
        raise ConfigError(HEAD_KEY, f"{path} holds no projection head: expected 'linear.weight' (this project) "
                                    f"or 'cluster1.0.weight' (STEGO), under any prefix")
    if len(heads) > 1:
        names = ", ".join(repr(prefix or "(none)") for prefix in sorted(heads))
        raise ConfigError(HEAD_KEY, f"{path} holds several projection heads (prefixes {names}); save only one")
    return next(iter(heads.values()))


def _as_1x1(tensors: dict[str, torch.Tensor], name: str, rows: int | None, cols: int | None,
            path: Path) -> torch.Tensor:
    """``tensors[name]`` as a [rows, cols, 1, 1] float32 kernel (None = any size), or a one-line error."""
    weight = tensors[name]
    if weight.dim() == 2:
        weight = weight[:, :, None, None]
    want = f"[{rows if rows else 'out'}, {cols if cols else 'in'}, 1, 1]"
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1) or (rows and weight.shape[0] != rows) or (
        cols and weight.shape[1] != cols
    ):
        raise ConfigError(HEAD_KEY, f"{path}: '{name}' has shape {list(tensors[name].shape)}, expected {want} "
                                    "(1x1 convolutions only)")
    return weight.to(torch.float32)


def _bias(tensors: dict[str, torch.Tensor], name: str, size: int, path: Path) -> torch.Tensor | None:
    bias = tensors.get(name)
    if bias is not None and tuple(bias.shape) != (size,):
        raise ConfigError(HEAD_KEY, f"{path}: '{name}' has shape {list(bias.shape)}, expected [{size}]")
    return None if bias is None else bias.to(torch.float32)


def load_projection_head(path: str | Path, in_channels: int | None = None, backbone: str = "") -> ProjectionHead:
    """Read the head in ``path`` (format: :mod:`primaps_dist.backbones.projection_head`) into a :class:`ProjectionHead` in eval mode.

    Raises a one-line UserError naming ``backbone.head_weights`` and the file: missing or unreadable file, no
    head inside, a malformed tensor, or (when ``in_channels`` is given) a head made for a different channel count.
    """
    path = Path(path)
    tensors = _head_tensors(load_weights_file(path, key=HEAD_KEY), path)
    linear = _as_1x1(tensors, "linear.weight", None, None, path)
    out_channels, channels = int(linear.shape[0]), int(linear.shape[1])
    if in_channels is not None and channels != in_channels:
        raise ConfigError(HEAD_KEY, f"{path} is a head for {channels}-channel features, but backbone "
                                    f"{backbone or '(configured)'} gives {in_channels} channels")
    parts = {"linear.weight": linear, "linear.bias": _bias(tensors, "linear.bias", out_channels, path)}
    hidden = 0
    if "nonlinear.0.weight" in tensors or "nonlinear.2.weight" in tensors:
        for name in ("nonlinear.0.weight", "nonlinear.2.weight"):
            if name not in tensors:
                raise ConfigError(HEAD_KEY, f"{path}: the nonlinear branch needs both 'nonlinear.0.weight' "
                                            "and 'nonlinear.2.weight' (STEGO: cluster2.0 / cluster2.2); "
                                            f"'{name}' is missing")
        first = _as_1x1(tensors, "nonlinear.0.weight", None, channels, path)
        hidden = int(first.shape[0])
        parts.update({
            "nonlinear.0.weight": first,
            "nonlinear.0.bias": _bias(tensors, "nonlinear.0.bias", hidden, path),
            "nonlinear.2.weight": _as_1x1(tensors, "nonlinear.2.weight", out_channels, hidden, path),
            "nonlinear.2.bias": _bias(tensors, "nonlinear.2.bias", out_channels, path),
        })
    head = ProjectionHead(channels, out_channels, hidden, bias=True)
    state = head.state_dict()
    for name, value in parts.items():
        state[name] = value if value is not None else torch.zeros_like(state[name])
    head.load_state_dict(state)
    return head.eval()


def projection_head_shaped_like(state: Mapping[str, torch.Tensor]) -> ProjectionHead:
    """An (untrained) :class:`ProjectionHead` with the sizes of the head whose state dict is ``state``.

    ``state``: a :class:`ProjectionHead`'s own tensor names without prefix (``linear.weight`` ``[D, C, 1, 1]``,
    optional ``linear.bias`` ``[D]``, optional branch ``nonlinear.0.weight`` ``[H, C, 1, 1]`` ...), as an export
    stores them. Load ``state`` into the result to get the head back. ValueError when the sizes cannot be read.
    """
    linear = state.get("linear.weight")
    if linear is None or linear.dim() != 4:
        raise ValueError("no 4-d 'linear.weight' among the head's tensors")
    first = state.get("nonlinear.0.weight")
    if first is not None and first.dim() != 4:
        raise ValueError(f"'nonlinear.0.weight' has shape {list(first.shape)}, expected [hidden, in, 1, 1]")
    hidden = 0 if first is None else int(first.shape[0])
    return ProjectionHead(int(linear.shape[1]), int(linear.shape[0]), hidden, bias="linear.bias" in state)


def attach_projection_head(extractor: FeatureExtractor, head: nn.Module, label: str) -> FeatureExtractor:
    """``extractor`` followed by ``head`` (``[B, C, h, w] -> [B, D, h, w]``, with ``out_channels`` D): a frozen
    :class:`FeatureExtractor` named ``"<name> + head <label>"`` with D channels (same stride, input normalisation
    and precision). Its state dict holds the backbone under ``body.0.*`` and the head under ``body.1.*``
    (:data:`HEAD_STATE_PREFIX`)."""
    mean = std = None
    if extractor.normalises_input:
        mean, std = extractor.mean.flatten().tolist(), extractor.std.flatten().tolist()
    return FeatureExtractor(
        nn.Sequential(extractor.body, head),
        name=f"{extractor.name} + head {label}",
        stride=extractor.stride,
        out_channels=int(head.out_channels),
        mean=mean,
        std=std,
        precision=extractor.precision,
    )


def with_projection_head(extractor: FeatureExtractor, path: str | Path) -> FeatureExtractor:
    """``extractor`` followed by the head in ``path`` (:func:`load_projection_head`, checked against the
    extractor's channels, then :func:`attach_projection_head`)."""
    head = load_projection_head(path, extractor.out_channels, extractor.name)
    return attach_projection_head(extractor, head, Path(path).name)
