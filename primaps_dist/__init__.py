"""primaps-dist: distributed PriMaPs-EM for unsupervised semantic segmentation.

Pipeline (one training step): WebDataset shards -> ``data`` -> frozen ``backbones`` ->
``primaps`` proposals + ``crf`` -> ``pseudo_labels`` -> ``em`` prototype update
(all-reduced statistics) -> ``metrics`` -> ``tracking`` (MLflow, rank 0).
"""

__version__ = "0.1.0"

__all__ = ["Segmenter"]


def __getattr__(name: str):
    """``from primaps_dist import Segmenter`` without importing torch for every ``primaps_dist`` import."""
    if name == "Segmenter":
        from primaps_dist.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'primaps_dist' has no attribute {name!r}")
