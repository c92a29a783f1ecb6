"""A trained model users can ship: :class:`Segmenter` (Python API), ``export`` (a folder that runs without
primaps_dist), the MLflow pyfunc model, and batch inference (``python -m primaps_dist.predict``).

Layout: ``standalone.py`` the sliding window (no primaps_dist imports; copied into exports), ``core.py`` the
Segmenter, ``export.py`` the export folder, ``mlflow_model.py`` the MLflow model.
"""

from primaps_dist.segmenter.core import Segmenter, WindowScorer, load_assignment

__all__ = ["Segmenter", "WindowScorer", "load_assignment"]
