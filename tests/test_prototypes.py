"""Nearest-prototype scoring, assignment and prediction (primaps_dist.prototypes), against direct formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from primaps_dist.prototypes import (
    CRF_TEMPERATURE,
    cosine_scores,
    nearest_prototype,
    nearest_prototype_upsampled,
    predict_clusters,
)

torch.set_num_threads(1)


def test_nearest_prototype_cosine_argmax_ties_and_shapes():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # rows 0 and 2 tie everywhere
    features = torch.tensor([[5.0, 1.0], [0.1, 3.0], [1.0, 1.0], [-1.0, 0.0]])
    # [1,1]: 0 and 1 tie -> 0; [-1,0]: 1 (0 > -1)
    assert nearest_prototype(features, prototypes).tolist() == [0, 1, 0, 1]
    maps = torch.randn(2, 2, 3, 4)
    labels = nearest_prototype(maps, prototypes)
    assert labels.shape == (2, 3, 4) and labels.dtype == torch.int64
    assert torch.equal(labels.reshape(-1), nearest_prototype(maps.permute(0, 2, 3, 1).reshape(-1, 2), prototypes))
    assert torch.equal(nearest_prototype(maps * 7.0, prototypes), labels)  # scale invariant
    with pytest.raises(ValueError, match="prototypes have shape"):
        nearest_prototype(features, torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"\[N, C\] or \[B, C, H, W\]"):
        nearest_prototype(torch.ones(2, 2, 2), prototypes)


def test_nearest_prototype_upsampled_equals_upsampled_normalised_features():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 16, 5, 7, generator=generator) + 0.3
    prototypes = F.normalize(torch.randn(6, 16, generator=generator), dim=1)
    predicted = nearest_prototype_upsampled(features, prototypes, (40, 56))
    upsampled = F.normalize(F.interpolate(features, (40, 56), mode="bilinear", align_corners=False), dim=1)
    expected = torch.einsum("kc,bchw->bkhw", prototypes, upsampled).argmax(1)
    assert predicted.shape == (2, 40, 56) and predicted.dtype == torch.int64
    assert (predicted == expected).float().mean() >= 0.999
    with pytest.raises(ValueError, match="prototypes"):
        nearest_prototype_upsampled(features, prototypes[:, :8], (4, 4))


def test_cosine_scores_are_cosines():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 8, 3, 4, generator=generator)
    prototypes = torch.randn(5, 8, generator=generator) * 3.0  # not unit: normalised inside
    scores = cosine_scores(features, prototypes)
    assert scores.shape == (2, 5, 3, 4)
    for b, k, i, j in [(0, 0, 0, 0), (1, 4, 2, 3), (0, 2, 1, 2)]:
        expected = F.cosine_similarity(features[b, :, i, j], prototypes[k], dim=0)
        assert float(scores[b, k, i, j]) == pytest.approx(float(expected), abs=1e-6)
    # At the features' own positions the argmax is the nearest prototype.
    unit = F.normalize(prototypes, dim=1)
    assert torch.equal(scores.argmax(1), nearest_prototype(features, unit))


class _Identity(torch.nn.Module):
    """A 'backbone' whose features are the image itself at stride 2 (average pooling)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, 2)


def test_predict_clusters_upsamples_cosines_flips_and_feeds_the_crf():
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 8, 10, generator=generator)
    prototypes = F.normalize(torch.randn(4, 3, generator=generator), dim=1)
    backbone = _Identity()
    features = backbone(images)
    expected = F.interpolate(cosine_scores(features, prototypes), (8, 10), mode="bilinear", align_corners=False)
    assert torch.equal(predict_clusters(backbone, prototypes, images), expected.argmax(1))

    flipped = 0.5 * (features + backbone(images.flip(-1)).flip(-1))
    expected = F.interpolate(cosine_scores(flipped, prototypes), (8, 10), mode="bilinear", align_corners=False)
    assert torch.equal(predict_clusters(backbone, prototypes, images, flip=True), expected.argmax(1))

    seen = {}

    def crf(log_probabilities, crf_images):
        seen["log_probabilities"], seen["images"] = log_probabilities, crf_images
        return -log_probabilities  # the argmax becomes the least similar prototype

    crf_prediction = predict_clusters(backbone, prototypes, images, crf_fn=crf)
    plain = F.interpolate(cosine_scores(features, prototypes), (8, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen["log_probabilities"], F.log_softmax(plain / CRF_TEMPERATURE, dim=1))
    torch.testing.assert_close(seen["images"], images * 255.0)
    assert torch.equal(crf_prediction, plain.argmin(1))
