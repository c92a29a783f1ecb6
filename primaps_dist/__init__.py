"""primaps-dist: distributed PriMaPs-EM for unsupervised semantic segmentation.

Pipeline (one training step): WebDataset shards -> ``data`` -> frozen ``backbones`` ->
``primaps`` proposals + ``crf`` -> ``pseudo_labels`` -> ``em`` prototype update
(all-reduced statistics) -> ``metrics`` -> ``tracking`` (MLflow, rank 0).
"""

__version__ = "0.1.0"
