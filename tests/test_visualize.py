"""Pictures: palette, colorize, overlay, grids, proposals, confusion and IoU charts."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from primaps_dist import visualize as vis


@given(st.integers(min_value=1, max_value=255))
@settings(max_examples=25, deadline=None)
def test_palette_colours_are_distinct_and_never_black(k):
    colors = vis.palette(k)
    assert colors.shape == (k, 3) and colors.dtype == np.uint8
    assert len({tuple(c) for c in colors.tolist()}) == k
    assert not np.any(np.all(colors == 0, axis=1))
    # deterministic and prefix-stable: class i keeps its colour whatever K is
    np.testing.assert_array_equal(vis.palette(k), colors)
    np.testing.assert_array_equal(vis.palette(255)[:k], colors)


def test_palette_rejects_bad_sizes():
    with pytest.raises(ValueError, match="palette size"):
        vis.palette(256)


def test_colorize_maps_classes_and_ignore():
    labels = np.array([[0, 1], [2, 255]], dtype=np.int64)
    colors = vis.colorize(labels, num_classes=3)
    assert colors.shape == (2, 2, 3) and colors.dtype == np.uint8
    expected = vis.palette(3)
    np.testing.assert_array_equal(colors[0, 0], expected[0])
    np.testing.assert_array_equal(colors[0, 1], expected[1])
    np.testing.assert_array_equal(colors[1, 0], expected[2])
    np.testing.assert_array_equal(colors[1, 1], [0, 0, 0])
    # torch input works the same
    np.testing.assert_array_equal(vis.colorize(torch.from_numpy(labels), 3), colors)
    with pytest.raises(ValueError, match="outside"):
        vis.colorize(labels, num_classes=2)
    with pytest.raises(ValueError, match=">= 0"):
        vis.colorize(np.array([[-1, 0]]))
    with pytest.raises(ValueError, match="integers"):
        vis.colorize(np.zeros((2, 2), dtype=np.float32))


def test_overlay_blends_and_keeps_ignored_pixels():
    image = np.full((4, 6, 3), 100, dtype=np.uint8)
    labels = np.zeros((4, 6), dtype=np.int64)
    labels[:, 3:] = 255
    out = vis.overlay(image, labels, alpha=0.5, num_classes=1)
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    colour = vis.palette(1)[0].astype(np.float64)
    np.testing.assert_allclose(out[0, 0], np.floor(100 * 0.5 + colour * 0.5 + 0.5), atol=1)
    np.testing.assert_array_equal(out[:, 3:], image[:, 3:])
    # float 0..1 images and CHW layout give the same picture
    float_chw = torch.full((3, 4, 6), 100 / 255.0)
    np.testing.assert_allclose(vis.overlay(float_chw, labels, 0.5, 1).astype(int), out.astype(int), atol=1)
    # alpha 0 = image, alpha 1 = colours
    np.testing.assert_array_equal(vis.overlay(image, labels, 0.0, 1), image)
    np.testing.assert_array_equal(vis.overlay(image, labels, 1.0, 1)[0, 0], vis.palette(1)[0])


def test_overlay_resizes_low_resolution_labels():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    labels = np.array([[0, 1], [1, 0]])
    out = vis.overlay(image, labels, alpha=1.0, num_classes=2)
    np.testing.assert_array_equal(out[:4, :4], np.broadcast_to(vis.palette(2)[0], (4, 4, 3)))
    np.testing.assert_array_equal(out[:4, 4:], np.broadcast_to(vis.palette(2)[1], (4, 4, 3)))


def test_save_overlay_grid_size(tmp_path):
    n, h, w = 3, 20, 30
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    preds = rng.integers(0, 5, size=(n, h, w))
    targets = rng.integers(0, 5, size=(n, h, w))
    targets[:, :2] = 255
    path = vis.save_overlay_grid(list(images), list(preds), list(targets), tmp_path / "sub" / "grid.png")
    with Image.open(path) as picture:
        assert picture.size == (3 * w + 2 * 4, 16 + n * h + (n - 1) * 4)
        pixels = np.asarray(picture.convert("RGB"))
    # first column is the untouched image
    np.testing.assert_array_equal(pixels[16:16 + h, :w], images[0])
    # without targets: two columns
    grid = vis.overlay_grid(list(images), list(preds), None)
    assert grid.shape == (16 + n * h + (n - 1) * 4, 2 * w + 4, 3)
    with pytest.raises(ValueError, match="same length"):
        vis.overlay_grid(list(images), list(preds[:2]), None)


def test_draw_proposals(tmp_path):
    image = np.full((16, 16, 3), 50, dtype=np.uint8)
    ids = np.zeros((4, 4), dtype=np.int64)  # patch resolution, upsampled to the image
    ids[:2, :2] = 1
    ids[2:, 2:] = 2
    path = vis.draw_proposals(image, ids, tmp_path / "proposals.png")
    with Image.open(path) as picture:
        assert picture.size == (2 * 16 + 4, 16 + 16)
        pixels = np.asarray(picture.convert("RGB"))
    drawn = pixels[16:, 16 + 4:]
    np.testing.assert_array_equal(drawn[12, 4], image[12, 4])  # background stays the image
    assert not np.array_equal(drawn[2, 2], image[2, 2])  # proposal 1 coloured
    assert not np.array_equal(drawn[2, 2], drawn[13, 13])  # proposals differ
    # soft masks [N, h, w] give the same picture
    soft = np.stack([(ids == 1).astype(np.float32), (ids == 2).astype(np.float32)])
    np.testing.assert_array_equal(vis.proposal_picture(image, soft), pixels)


def test_plot_confusion_and_iou(tmp_path):
    confusion = np.array([[8, 2, 0], [0, 0, 0], [1, 1, 8]], dtype=np.int64)
    np.testing.assert_allclose(vis.row_normalise(confusion), [[0.8, 0.2, 0], [0, 0, 0], [0.1, 0.1, 0.8]])
    names = ["road", "sky", "car"]
    path = vis.plot_confusion(confusion, names, tmp_path / "confusion.png", cluster_for_class=[2, 0, 1])
    with Image.open(path) as picture:
        small = picture.size
        reordered = np.asarray(picture.convert("RGB"))
    assert small[0] > 300 and small[1] > 300
    with Image.open(vis.plot_confusion(confusion, names, tmp_path / "plain.png")) as picture:
        assert not np.array_equal(np.asarray(picture.convert("RGB")), reordered)  # the columns were reordered
    big = np.random.default_rng(0).integers(0, 100, size=(27, 27))
    with Image.open(vis.plot_confusion(big, None, tmp_path / "confusion27.png")) as picture:
        assert picture.size[0] > small[0] and picture.size[1] > small[1]  # room for 27 rows and columns
    with pytest.raises(ValueError, match=r"\[K, K\]"):
        vis.plot_confusion(np.zeros((2, 3)), None, tmp_path / "bad.png")
    ious = np.array([0.5, np.nan, 0.25])
    path = vis.plot_per_class_iou(ious, ["road", "sky", "car"], tmp_path / "iou.png")
    with Image.open(path) as picture:
        assert picture.size == (600, 450)
    with pytest.raises(ValueError, match="class names"):
        vis.plot_per_class_iou(ious, ["a"], tmp_path / "bad.png")
