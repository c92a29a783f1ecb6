"""Sliding-window segmentation around a window program; imports nothing from primaps_dist.

This file is both the sliding-window code of :class:`primaps_dist.Segmenter` and, copied as ``segment.py``
into every export folder, the runner of an exported model on a machine without primaps_dist:

    python MODEL_DIR/segment.py MODEL_DIR photo.jpg --out labels/       # needs torch (and pillow for files)

    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("segment", "MODEL_DIR/segment.py")
    segment = importlib.util.module_from_spec(spec); spec.loader.exec_module(segment)
    model = segment.load("MODEL_DIR")
    label_maps = model.segment([rgb_uint8_array])        # list of int64 [H, W] tensors

A *window program* maps windows ``[N, 3, S, S]`` (float RGB in 0..1, S = the training crop) to per-class scores
``[N, K, S, S]``. An image of any size is padded to at least S x S (reflect, replicate where the image is too
small), cut into S x S windows that overlap by a third, and the scores of every pixel are averaged over the
windows that contain it. The dense CRF (``eval.crf``) is not part of the exported program; ``segment.py``
returns the argmax of the averaged scores (primaps_dist's Segmenter applies the CRF when asked).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

FORMAT = "primaps-dist-segmenter"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
PROGRAM_NAME = "window_program.pt2"
IGNORE_ID = 255  # a cluster that the Hungarian assignment left unmatched


def window_starts(length: int, window: int) -> list[int]:
    """Start offsets of windows of ``window`` pixels covering ``length >= window`` pixels, overlapping by about a
    third of a window; the last window ends at the edge."""
    if length <= window:
        return [0]
    step = max(1, window - window // 3)
    starts = list(range(0, length - window, step))
    starts.append(length - window)
    return starts


def pad_to_window(image: torch.Tensor, window: int) -> torch.Tensor:
    """``[3, H, W]`` -> ``[3, max(H, S), max(W, S)]``: padded right and bottom (reflect; replicate when the pad is
    as long as the image)."""
    height, width = image.shape[-2:]
    pad_h, pad_w = max(0, window - height), max(0, window - width)
    if pad_h == 0 and pad_w == 0:
        return image
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(image[None], (0, pad_w, 0, pad_h), mode=mode)[0]


def sliding_window_scores(score_windows: Callable[[torch.Tensor], torch.Tensor], images: Sequence[torch.Tensor],
                          window: int, batch_size: int = 8) -> list[torch.Tensor]:
    """Average window scores per pixel: images ``[3, H_i, W_i]`` float 0..1 -> scores ``[K, H_i, W_i]`` float32.

    Windows of all images go through ``score_windows`` together, ``batch_size`` at a time. An image of exactly
    S x S is one window: its scores are the program's output unchanged.
    """
    padded = [pad_to_window(image.float(), window) for image in images]
    places = [(index, top, left) for index, image in enumerate(padded)
              for top in window_starts(image.shape[-2], window) for left in window_starts(image.shape[-1], window)]
    sums: list[torch.Tensor | None] = [None] * len(padded)
    counts = [torch.zeros(1, *image.shape[-2:], device=image.device) for image in padded]
    for begin in range(0, len(places), max(1, batch_size)):
        chunk = places[begin:begin + max(1, batch_size)]
        crops = torch.stack([padded[i][:, top:top + window, left:left + window] for i, top, left in chunk])
        scores = score_windows(crops).float()
        for (i, top, left), score in zip(chunk, scores):
            if sums[i] is None:
                sums[i] = torch.zeros(score.shape[0], *padded[i].shape[-2:], device=score.device)
            sums[i][:, top:top + window, left:left + window] += score
            counts[i][:, top:top + window, left:left + window] += 1
    out = []
    for image, total, count in zip(images, sums, counts):
        height, width = image.shape[-2:]
        out.append((total / count.to(total.device))[:, :height, :width])
    return out


def as_image_tensor(image, device: torch.device | str = "cpu") -> torch.Tensor:
    """One image -> ``[3, H, W]`` float32 in 0..1: ``uint8 [H, W, 3]`` array or tensor, a float ``[3, H, W]``
    tensor in 0..1, or a PIL image."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image, without importing PIL
        import numpy as np

        image = np.asarray(image.convert("RGB"))
    tensor = torch.as_tensor(image)
    if tensor.dtype == torch.uint8:
        if tensor.dim() != 3 or tensor.shape[-1] != 3:
            raise ValueError(f"a uint8 image must have shape [H, W, 3], got {list(tensor.shape)}")
        return tensor.to(device).permute(2, 0, 1).float() / 255.0
    if not tensor.is_floating_point() or tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"images must be uint8 [H, W, 3] or float [3, H, W] in 0..1, got {tensor.dtype} "
                         f"{list(tensor.shape)}")
    return tensor.to(device).float()


class ExportedSegmenter:
    """An export folder's window program with the sliding window and the class assignment; no CRF."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        folder = Path(folder)
        self.config = json.loads((folder / CONFIG_NAME).read_text())
        if self.config.get("format") != FORMAT or self.config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder / CONFIG_NAME}: not a {FORMAT} version {FORMAT_VERSION} config")
        self.device = torch.device(device)
        self.program = torch.export.load(str(folder / PROGRAM_NAME)).module().to(self.device)
        self.window = int(self.config["crop_size"])
        assignment = self.config.get("assignment")
        self.lookup = None
        if assignment is not None:
            self.lookup = torch.tensor([a if a >= 0 else IGNORE_ID for a in assignment], dtype=torch.int64)
        self.class_names = self.config.get("class_names")

    def scores(self, images: Sequence, batch_size: int = 8) -> list[torch.Tensor]:
        """Averaged window scores ``[K, H, W]`` per image."""
        tensors = [as_image_tensor(image, self.device) for image in images]
        with torch.no_grad():
            return sliding_window_scores(self.program, tensors, self.window, batch_size)

    def segment(self, images: Sequence, batch_size: int = 8) -> list[torch.Tensor]:
        """int64 ``[H, W]`` ids per image: cluster ids, or class ids when the export carries an assignment."""
        maps = [score.argmax(0) for score in self.scores(images, batch_size)]
        if self.lookup is not None:
            maps = [self.lookup.to(ids.device)[ids] for ids in maps]
        return maps


def load(folder: str | Path, device: str = "cpu") -> ExportedSegmenter:
    return ExportedSegmenter(folder, device)


def main(argv: Sequence[str] | None = None) -> int:
    import numpy as np
    from PIL import Image

    parser = argparse.ArgumentParser(description="Segment images with an exported primaps-dist model (no CRF).")
    parser.add_argument("model", help="the export folder")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--out", required=True, help="folder for <name>.png label maps (8-bit ids)")
    args = parser.parse_args(argv)
    model = load(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in map(Path, args.images):
        with Image.open(path) as image:
            rgb = np.array(image.convert("RGB"))
        (ids,) = model.segment([rgb])
        Image.fromarray(ids.cpu().numpy().astype(np.uint8)).save(out / f"{path.stem}.png")
    print(f"wrote {len(args.images)} label maps to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
