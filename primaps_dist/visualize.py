"""Pictures: coloured label maps, overlays, proposal drawings, confusion matrices and per-class IoU bars.

Label maps are integer ``[H, W]`` arrays (NumPy or torch) with classes ``0..K-1`` and the ignore id 255,
drawn black. Images are ``[H, W, 3]`` (or ``[3, H, W]``) uint8 0..255 or float 0..1. Overlays are composed
with NumPy and written with PIL; charts use matplotlib's Agg canvas directly (no pyplot, no global backend
switch, safe on headless nodes and in threads).
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from primaps_dist.labels import IGNORE_INDEX

# Kelly's colours of maximum contrast, without white and black (black is reserved for "ignore").
_KELLY = (
    "F3C300", "875692", "F38400", "A1CAF1", "BE0032", "C2B280", "848482", "008856", "E68FAC", "0067A5",
    "F99379", "604E97", "F6A600", "B3446C", "DCD300", "882D17", "8DB600", "654522", "E25822", "2B3D26",
)
_GAP = 4  # pixels between grid cells
_HEADER = 16  # pixels of the title strip above grids
_GOLDEN = 0.618033988749895


def palette(num_colors: int) -> np.ndarray:
    """``num_colors`` distinct, non-black colours as uint8 ``[K, 3]`` (K <= 255; deterministic)."""
    if not 0 <= num_colors <= IGNORE_INDEX:
        raise ValueError(f"palette size must be in 0..{IGNORE_INDEX}, got {num_colors}")
    colors: list[tuple[int, int, int]] = [tuple(int(h[i:i + 2], 16) for i in (0, 2, 4)) for h in _KELLY]
    seen = set(colors)
    index = 0
    while len(colors) < num_colors:  # golden-ratio hues over a few saturation/brightness levels
        hue = (index * _GOLDEN) % 1.0
        saturation = (0.95, 0.6, 0.8)[index % 3]
        value = (1.0, 0.7, 0.85)[(index // 3) % 3]
        color = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, saturation, value))
        if color not in seen:
            seen.add(color)
            colors.append(color)
        index += 1
    return np.asarray(colors[:num_colors], dtype=np.uint8).reshape(num_colors, 3)


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _to_labels(labels: Any) -> np.ndarray:
    labels = _to_numpy(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be [H, W], got shape {tuple(labels.shape)}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    return labels.astype(np.int64)


def _to_image(image: Any) -> np.ndarray:
    """uint8 ``[H, W, 3]`` from uint8/float, HWC/CHW/HW input (floats are 0..1, clipped)."""
    image = _to_numpy(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] not in (1, 3):
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be [H, W, 3], [3, H, W] or [H, W], got shape {tuple(image.shape)}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.clip(image, 0, 255).astype(np.uint8)


def _resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize (e.g. patch-resolution proposals to image size)."""
    if labels.shape == (height, width):
        return labels
    rows = (np.arange(height) * labels.shape[0]) // height
    cols = (np.arange(width) * labels.shape[1]) // width
    return labels[rows[:, None], cols[None, :]]


def colorize(labels: Any, num_classes: int | None = None) -> np.ndarray:
    """uint8 ``[H, W, 3]`` colours of a label map (``palette(K)``; 255 -> black).

    ``num_classes`` defaults to the largest label + 1; pass it to keep colours stable across maps.
    Raises ValueError for labels outside ``0..K-1`` other than 255.
    """
    labels = _to_labels(labels)
    valid = labels[labels != IGNORE_INDEX]
    if valid.size and valid.min() < 0:
        raise ValueError(f"labels must be >= 0 (or {IGNORE_INDEX}), found {int(valid.min())}")
    if num_classes is None:
        num_classes = int(valid.max()) + 1 if valid.size else 0
    if valid.size and valid.max() >= num_classes:
        raise ValueError(f"label {int(valid.max())} is outside 0..{num_classes - 1} (and not {IGNORE_INDEX})")
    lut = np.zeros((IGNORE_INDEX + 1, 3), dtype=np.uint8)  # IGNORE_INDEX -> black
    lut[:num_classes] = palette(num_classes)
    return lut[np.clip(labels, 0, IGNORE_INDEX)]


def overlay(image: Any, labels: Any, alpha: float = 0.5, num_classes: int | None = None) -> np.ndarray:
    """Blend label colours over ``image``: uint8 ``[H, W, 3]``; ignored pixels (255) keep the image.

    ``labels`` of another size are resized (nearest) to the image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = _to_image(image)
    labels = _resize_labels(_to_labels(labels), image.shape[0], image.shape[1])
    colors = colorize(labels, num_classes).astype(np.float32)
    blended = image.astype(np.float32) * (1.0 - alpha) + colors * alpha
    blended = np.where((labels != IGNORE_INDEX)[..., None], blended, image.astype(np.float32))
    return (blended + 0.5).astype(np.uint8)


def _boundaries(ids: np.ndarray) -> np.ndarray:
    """True where a pixel's id differs from its right or lower neighbour."""
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    return edge


def _grid(rows: list[list[np.ndarray]], titles: Sequence[str]) -> np.ndarray:
    """Tile equally sized uint8 cells with white gaps and a title strip; ``[header + n*H + gaps, m*W + gaps, 3]``."""
    height, width = rows[0][0].shape[:2]
    n_rows, n_cols = len(rows), len(rows[0])
    canvas = np.full((_HEADER + n_rows * height + (n_rows - 1) * _GAP, n_cols * width + (n_cols - 1) * _GAP, 3),
                     255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            top, left = _HEADER + r * (height + _GAP), c * (width + _GAP)
            canvas[top:top + height, left:left + width] = cell
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for c, title in enumerate(titles):
        draw.text((c * (width + _GAP) + 2, 2), title, fill=(0, 0, 0), font=font)
    return np.asarray(picture)


def overlay_grid(images: Sequence[Any], predictions: Sequence[Any], targets: Sequence[Any] | None = None, *,
                 num_classes: int | None = None, alpha: float = 0.6) -> np.ndarray:
    """One row per image: image | prediction overlay | ground-truth overlay (uint8 array).

    Predictions should already be mapped to classes (Hungarian matching) so colours agree with targets.
    Size: ``[16 + N*H + (N-1)*4, C*W + (C-1)*4, 3]`` with C = 3 columns (2 without targets).
    """
    images = [_to_image(image) for image in images]
    if not images:
        raise ValueError("overlay_grid needs at least one image")
    if len(predictions) != len(images) or (targets is not None and len(targets) != len(images)):
        raise ValueError("images, predictions and targets must have the same length")
    if any(image.shape != images[0].shape for image in images):
        raise ValueError("all images of a grid must have the same size")
    label_maps = [_to_labels(p) for p in predictions] + [_to_labels(t) for t in (targets or [])]
    if num_classes is None:
        valid = [m[m != IGNORE_INDEX] for m in label_maps]
        num_classes = max((int(v.max()) + 1 for v in valid if v.size), default=0)
    rows = []
    for index, image in enumerate(images):
        row = [image, overlay(image, predictions[index], alpha, num_classes)]
        if targets is not None:
            row.append(overlay(image, targets[index], alpha, num_classes))
        rows.append(row)
    titles = ["image", "prediction"] + (["ground truth"] if targets is not None else [])
    return _grid(rows, titles)


def save_overlay_grid(images: Sequence[Any], predictions: Sequence[Any], targets: Sequence[Any] | None,
                      path: str | os.PathLike, *, num_classes: int | None = None, alpha: float = 0.6) -> Path:
    """Write :func:`overlay_grid` as an image file (format from the suffix, e.g. .png); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay_grid(images, predictions, targets, num_classes=num_classes, alpha=alpha)).save(path)
    return path


def proposal_picture(image: Any, mask_ids: Any, alpha: float = 0.6) -> np.ndarray:
    """image | proposals coloured over it, with white proposal borders (uint8 array).

    ``mask_ids``: int ``[h, w]`` with 0 = background (not coloured) and 1..N the proposals, or soft masks
    ``[N, h, w]`` (a pixel takes its strongest proposal; all-zero pixels are background). Resized (nearest)
    to the image. Size: ``[16 + H, 2*W + 4, 3]``.
    """
    image = _to_image(image)
    ids = _to_numpy(mask_ids)
    if ids.ndim == 3:
        ids = np.where(ids.max(axis=0) > 0, ids.argmax(axis=0) + 1, 0)
    ids = _resize_labels(_to_labels(ids), image.shape[0], image.shape[1])
    if ids.min() < 0:
        raise ValueError(f"proposal ids must be >= 0, found {int(ids.min())}")
    count = int(ids.max())
    if count >= IGNORE_INDEX:
        raise ValueError(f"at most {IGNORE_INDEX - 1} proposals can be drawn, got ids up to {count}")
    # id 0 -> ignore (uncoloured), id i -> colour i-1
    labels = np.where(ids > 0, ids - 1, IGNORE_INDEX)
    drawn = overlay(image, labels, alpha, num_classes=max(count, 1))
    drawn[_boundaries(ids)] = 255
    return _grid([[image, drawn]], ["image", f"{count} proposals"])


def draw_proposals(image: Any, mask_ids: Any, path: str | os.PathLike, alpha: float = 0.6) -> Path:
    """Write :func:`proposal_picture` to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(proposal_picture(image, mask_ids, alpha)).save(path)
    return path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _names(class_names: Sequence[str] | None, count: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(count)]
    if len(class_names) != count:
        raise ValueError(f"{len(class_names)} class names for {count} classes")
    return [str(name) for name in class_names]


def row_normalise(confusion: Any) -> np.ndarray:
    """Each row divided by its sum (rows without pixels stay 0): float64 ``[K, K]``."""
    confusion = _to_numpy(confusion).astype(np.float64)
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)


def plot_confusion(confusion: Any, class_names: Sequence[str] | None, path: str | os.PathLike, *,
                   cluster_for_class: Sequence[int] | None = None, title: str | None = None) -> Path:
    """Row-normalised confusion heat map; rows are true classes, columns predicted classes.

    ``confusion[i, j]``: pixels of class i predicted as j, after Hungarian matching. If the matrix is in
    cluster order, pass ``cluster_for_class`` (the cluster matched to each class) to reorder the columns.
    """
    matrix = _to_numpy(confusion)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion must be [K, K], got shape {tuple(matrix.shape)}")
    if cluster_for_class is not None:
        matrix = matrix[:, np.asarray(cluster_for_class, dtype=np.int64)]
    count = matrix.shape[0]
    names = _names(class_names, count)
    normalised = row_normalise(matrix)
    side = max(5.0, 0.32 * count + 2.5)
    figure = _figure(side + 1.0, side)
    axes = figure.add_subplot(1, 1, 1)
    shown = axes.imshow(normalised, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    axes.set_xticks(range(count), names, rotation=90, fontsize=7)
    axes.set_yticks(range(count), names, fontsize=7)
    axes.set_xlabel("predicted class (matched)")
    axes.set_ylabel("true class")
    if count <= 12:
        for i in range(count):
            for j in range(count):
                value = normalised[i, j]
                axes.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                          color="black" if value > 0.6 else "white")
    axes.set_title(title or "confusion (row-normalised)")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def plot_per_class_iou(ious: Any, class_names: Sequence[str] | None, path: str | os.PathLike, *,
                       title: str | None = None) -> Path:
    """Bar chart of per-class IoU (0..1; NaN = class absent, drawn as 'n/a') with the mIoU as a line."""
    values = _to_numpy(ious).astype(np.float64).reshape(-1)
    count = values.size
    names = _names(class_names, count)
    defined = ~np.isnan(values)
    mean_iou = float(values[defined].mean()) if defined.any() else float("nan")
    figure = _figure(max(6.0, 0.35 * count + 2.0), 4.5)
    axes = figure.add_subplot(1, 1, 1)
    colors = palette(count).astype(np.float64) / 255.0
    axes.bar(np.arange(count), np.where(defined, values * 100.0, 0.0), color=colors, edgecolor="black", linewidth=0.5)
    for index in np.flatnonzero(~defined):
        axes.text(index, 1.0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    if defined.any():
        axes.axhline(mean_iou * 100.0, color="black", linestyle="--", linewidth=1)
    axes.set_xticks(range(count), names, rotation=90, fontsize=7)
    axes.set_ylim(0, 100)
    axes.set_ylabel("IoU (%)")
    axes.set_title(title or f"per-class IoU, mIoU {100 * mean_iou:.1f}%")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
