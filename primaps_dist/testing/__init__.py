"""Reference data shared by the tests (``tests/``) and the benchmarks (``bench/``).

Both import from here (``from primaps_dist.testing.crf_samples import sample_batch``), so neither reaches into
the other's folder. The modules build inputs (real photos, PriMaPs-like logits, planted feature maps) from
scratch, and the PriMaPs oracle is written from the paper, not from the package's proposal code. The only package
code they call is the backbone that turns photos into features (``photo_features``), which they are not used to
check. No module of the package outside ``testing`` imports them.

- :mod:`primaps_dist.testing.crf_samples`: scikit-image photos with PriMaPs-like log-probabilities, the input
  of the dense-CRF agreement tests and of ``bench/bench_crf.py``.
- :mod:`primaps_dist.testing.primaps_reference`: the per-image PriMaPs loop written from the paper, calling
  ``torch.pca_lowrank`` as published (the oracle of ``tests/test_primaps.py`` and ``bench/bench_primaps.py``),
  the adjusted Rand index and planted DINO-like feature maps.
- :mod:`primaps_dist.testing.photo_features`: real EfficientNet-Lite0 features of scikit-image's photos.
"""
