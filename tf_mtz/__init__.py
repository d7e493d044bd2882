"""tf_mtz: Multi-Task Zipping for Keras — several trained models into one shared-trunk network.

    zipped = tf_mtz.zip_models({"a": model_a, "b": model_b}, calibration_data=x)
    paper = tf_mtz.zip_models({"a": model_a, "b": model_b}, x, config=tf_mtz.ZipConfig.paper())
    tf_mtz.export_tflite(zipped, "zipped.tflite")
"""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tf_mtz import experimental, testing  # noqa: E402,F401
from tf_mtz.tasks import add_task  # noqa: E402
from tf_mtz.auto_sharing import AutoSharing  # noqa: E402
from tf_mtz.config import ZipConfig  # noqa: E402
from tf_mtz.errors import RankDeficientWarning, ZipError  # noqa: E402
from tf_mtz.export import export_saved_model, export_tflite, tflite_bytes  # noqa: E402
from tf_mtz.registry import (  # noqa: E402
    ClassTokenHandler,
    LayerHandler,
    PassThroughHandler,
    PositionEmbeddingHandler,
    UnitLayerHandler,
    register_layer_handler,
    unregister_layer_handler,
)
from tf_mtz.report import LayerReport, ZipReport  # noqa: E402
from tf_mtz.tf_keras_bridge import to_tf_keras  # noqa: E402
from tf_mtz.retrain import Retrain, fine_tune, paper_retrain  # noqa: E402
from tf_mtz.synthesis import SyntheticInputs  # noqa: E402
from tf_mtz.zipper import zip_models  # noqa: E402

__version__ = "0.13.0"

__all__ = [
    "zip_models", "add_task", "ZipConfig", "AutoSharing", "SyntheticInputs", "Retrain", "paper_retrain", "fine_tune",
    "export_tflite", "export_saved_model", "tflite_bytes", "to_tf_keras",
    "ZipReport", "LayerReport", "ZipError", "RankDeficientWarning",
    "register_layer_handler", "unregister_layer_handler", "LayerHandler", "UnitLayerHandler", "PassThroughHandler",
    "PositionEmbeddingHandler", "ClassTokenHandler",
]
