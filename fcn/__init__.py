"""FCN-32s/16s/8s and a distilled light student for street-scene semantic segmentation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fcn.predictor import Predictor

__version__ = "0.1.0"


def load(path: Any, **options: Any) -> Predictor:
    """A model from a training ``.ckpt``, an exported ``.onnx`` or TorchScript file, ready to ``segment``
    images (:func:`fcn.predictor.load_predictor`; torch loads on the first call, not on ``import fcn``)."""
    from fcn.predictor import load_predictor

    return load_predictor(path, **options)
