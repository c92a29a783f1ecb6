"""MLflow model-from-code file of the segmenter (copied into every MLflow model; imports no primaps_dist).

It loads the export folder's ``segment.py`` (the sliding window around the ``torch.export`` program) from the
model's artifacts. Input ``uint8 [B, H, W, 3]``, output ``int64 [B, H, W]``.
"""

import importlib.util
from pathlib import Path

import mlflow
import numpy as np


class SegmenterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        folder = Path(context.artifacts["export"])
        spec = importlib.util.spec_from_file_location("primaps_exported_segment", folder / "segment.py")
        runner = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runner)
        self.model = runner.load(folder)

    # The annotation only tells MLflow that the input is an array: MLflow infers no schema from np.ndarray
    # (the model's explicit signature does the validation) and stops warning "add type hints" at load time.
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        if isinstance(model_input, dict):  # a named tensor input
            (model_input,) = model_input.values()
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got shape {list(images.shape)}")
        maps = self.model.segment([image for image in images.astype(np.uint8)])
        return np.stack([ids.cpu().numpy().astype(np.int64) for ids in maps])


mlflow.models.set_model(SegmenterModel())
