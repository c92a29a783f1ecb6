"""The Segmenter (primaps_dist.segmenter): sliding windows against direct formulas, the evaluation rule, class
names, and predict's maps equal to evaluate's predictions on the same images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from primaps_dist.segmenter.standalone import pad_to_window, sliding_window_scores, window_starts
from support.demo import CROP, NUM_CLASSES
from support.run import run_main_in_process

pytestmark = pytest.mark.usefixtures("single_thread")


def test_window_starts_cover_with_overlap_and_end_at_the_edge():
    assert window_starts(64, 64) == [0]
    assert window_starts(10, 64) == [0]
    for length in (65, 100, 200, 257):
        starts = window_starts(length, 64)
        assert starts[0] == 0 and starts[-1] == length - 64 and starts == sorted(set(starts))
        gaps = np.diff(starts)
        assert (gaps <= 64 - 64 // 3).all() and (gaps > 0).all()  # neighbours overlap by at least a third


def test_sliding_window_average_of_a_pointwise_scorer_is_the_scorer_on_the_whole_image():
    # A per-pixel scorer gives the same score in every window, so the average must equal it exactly where
    # the image is; the counts come out right only if every window is added once and divided by its cover.
    weights = torch.randn(5, 3)

    def pointwise(windows):
        assert windows.shape[-2:] == (16, 16)
        return torch.einsum("kc,nchw->nkhw", weights, windows)

    images = [torch.rand(3, 40, 29), torch.rand(3, 16, 16), torch.rand(3, 9, 50)]
    got = sliding_window_scores(pointwise, images, 16, batch_size=3)
    for image, scores in zip(images, got):
        assert scores.shape == (5, *image.shape[-2:])
        torch.testing.assert_close(scores, torch.einsum("kc,chw->khw", weights, image), rtol=1e-5, atol=1e-5)


def test_sliding_window_averages_position_dependent_scores():
    # The scorer returns the window's left offset inside the padded image (read from a coordinate channel),
    # so the average at a pixel is the mean start of the windows covering it: computed here by hand.
    width = 40
    image = torch.zeros(3, 16, width)
    image[0] = torch.arange(width).float() / 100.0

    def left_offset(windows):
        return (windows[:, :1, :, :1] * 100.0).round().expand(-1, 1, 16, 16).clone()

    (scores,) = sliding_window_scores(left_offset, [image], 16, batch_size=2)
    starts = window_starts(width, 16)
    for column in range(width):
        covering = [s for s in starts if s <= column < s + 16]
        assert scores[0, 0, column].item() == pytest.approx(sum(covering) / len(covering))


def test_small_images_are_padded_to_one_window():
    image = torch.rand(3, 10, 30)
    padded = pad_to_window(image, 16)
    assert padded.shape == (3, 16, 30) and torch.equal(padded[:, :10], image)


@pytest.fixture(scope="module")
def demo_segmenter(demo_checkpoint):
    from primaps_dist import Segmenter

    return Segmenter.from_checkpoint(demo_checkpoint / "latest", device="cpu")


@pytest.mark.parametrize("crf", [False, True])
def test_one_crop_sized_image_follows_the_evaluation_rule(demo_segmenter, crf):
    """segment() on crop-sized images gives predict_clusters' maps, image by image. The segmenter runs the
    three windows through the backbone as one batch, the rule one image at a time, and the backbone's
    features differ with the batch size by rounding (up to 3e-5 here, while the two best cosine scores
    of a position can be 1e-5 apart): pixels whose two best scores are that close may go either way, so
    the maps are compared where the decision is clear (a CI run once failed on exact equality)."""
    import torch.nn.functional as F

    from primaps_dist.crf import make_crf
    from primaps_dist.prototypes import CRF_TEMPERATURE, cosine_scores, predict_clusters

    segmenter = demo_segmenter
    backbone, prototypes = segmenter.scorer.backbone, segmenter.scorer.prototypes
    images = torch.rand(3, 3, CROP, CROP, generator=torch.Generator().manual_seed(3))
    crf_fn = make_crf(iterations=2, downsample=1) if crf else None
    segmenter.crf_fn = crf_fn
    try:
        got = segmenter.segment(images)
    finally:
        segmenter.crf_fn = None
    expected = torch.cat([predict_clusters(backbone, prototypes, images[i:i + 1], crf_fn=crf_fn) for i in range(3)])
    with torch.inference_mode():  # the margin between the two best scores of the rule, per pixel
        scores = F.interpolate(cosine_scores(backbone(images), prototypes), size=(CROP, CROP), mode="bilinear",
                               align_corners=False)
        if crf_fn is not None:
            scores = crf_fn(F.log_softmax(scores / CRF_TEMPERATURE, dim=1), images * 255.0)
        best_two = scores.topk(2, dim=1).values
    clear = (best_two[:, 0] - best_two[:, 1]) > 1e-3
    assert clear.float().mean() > 0.98  # the comparison covers almost every pixel
    assert got.dtype == torch.int64 and got.shape == expected.shape
    assert torch.equal(got[clear], expected[clear])
    if not crf:  # a uint8 batch is the same images in 0..255
        as_bytes = (images * 255).round().to(torch.uint8)
        assert torch.equal(segmenter.segment(as_bytes), segmenter.segment(as_bytes.float() / 255.0))


def test_segment_returns_maps_at_every_input_size(demo_segmenter):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 50), (CROP, CROP), (96, 150))]
    maps = demo_segmenter.segment(images)
    assert [tuple(m.shape) for m in maps] == [(40, 50), (CROP, CROP), (96, 150)]
    assert all(m.dtype == torch.int64 and 0 <= int(m.min()) and int(m.max()) < NUM_CLASSES for m in maps)
    # a large image is not shrunk: where only the top-left window covers a pixel (rows < 32, columns < 43 for
    # windows starting at rows 0, 32 and columns 0, 43, 86), its score is that of the top-left crop alone
    assert window_starts(96, CROP) == [0, 32] and window_starts(150, CROP) == [0, 43, 86]
    (scores,) = demo_segmenter.scores([images[2]])
    (left,) = demo_segmenter.scores([images[2][:CROP, :CROP]])
    torch.testing.assert_close(scores[:, :32, :43], left[:, :32, :43], rtol=0, atol=1e-5)
    assert not torch.allclose(scores[:, :32, 43:CROP], left[:, :32, 43:CROP], atol=1e-3)  # averaged with window 2


def test_class_names_from_metrics_json_or_a_mapping(demo_segmenter, tmp_path):
    from primaps_dist import Segmenter

    image = np.random.default_rng(1).integers(0, 256, (CROP, CROP, 3), dtype=np.uint8)
    (clusters,) = demo_segmenter.segment([image])
    assignment = [3, 1, -1, 0, 5, 2]
    names = [f"name{i}" for i in range(NUM_CLASSES)]
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"assignment": assignment, "class_names": names}))
    named = Segmenter(demo_segmenter.scorer, crop_size=CROP).with_class_names(metrics)
    (classes,) = named.segment([image])
    lookup = torch.tensor([3, 1, 255, 0, 5, 2])
    assert torch.equal(classes, lookup[clusters]) and named.class_names == names
    mapped = Segmenter(demo_segmenter.scorer, crop_size=CROP).with_class_names({0: "sky", "1": "road"})
    assert mapped.class_names[:3] == ["sky", "road", "cluster_2"]
    assert torch.equal(mapped.segment([image])[0], clusters)


@pytest.mark.parametrize("crf", [False, True])
def test_predict_maps_equal_evaluate_predictions(demo_checkpoint, demo_data, tmp_path, crf):
    """evaluate's predictions (its overlay records, matched to classes) on the validation crops equal the label
    maps predict writes for the same crops saved as PNG files."""
    from primaps_dist import distributed as dist
    from primaps_dist.backbones import build_backbone
    from primaps_dist.config import resolve_run_config
    from primaps_dist.evaluate import evaluate_prototypes, write_reports
    from primaps_dist.train_state import load_train_state

    overrides = [f"data.val_shards={demo_data.val_shards}", "eval.resize_short=96", f"eval.crf={str(crf).lower()}",
                 "eval.crf_downsample=2"]
    saved = load_train_state(demo_checkpoint / "latest")
    cfg = resolve_run_config(saved.config, None, overrides)
    env = dist.DistEnv()
    backbone = build_backbone(cfg.backbone, "cpu")
    result = evaluate_prototypes(cfg, env, backbone, saved.prototypes, torch.device("cpu"), num_overlays=8)
    assert len(result.overlays) == 8
    metrics = write_reports(result, tmp_path / "eval", cfg)[0]
    crops = tmp_path / "crops"
    crops.mkdir()
    for i, (picture, _, _) in enumerate(result.overlays):
        Image.fromarray(picture).save(crops / f"img{i}.png")
    out = tmp_path / "predicted"
    done = run_main_in_process("primaps_dist.predict", ["--checkpoint", str(demo_checkpoint / "latest"),
                                                        "--images", str(crops), "--out", str(out),
                                                        "--assignment", str(metrics), "--batch-size", "3",
                                                        *overrides])
    assert done.returncode == 0, done.describe()
    for i, (_, prediction, _) in enumerate(result.overlays):
        written = np.array(Image.open(out / f"img{i}.png"))
        assert np.array_equal(written, prediction.astype(np.uint8)), f"img{i}: {np.mean(written != prediction):.4f}"
