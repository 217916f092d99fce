"""Caffe models, served by ONNX Runtime after conversion (cached; see dl_inference.convert.caffe)."""

from __future__ import annotations

import logging
from pathlib import Path

from dl_inference.backends.onnxruntime_backend import OnnxRuntimeBackend
from dl_inference.convert.caffe.cache import converted_model, find_caffe_files
from dl_inference.convert.caffe.preprocess import preprocess_from_config
from dl_inference.errors import NotFound
from dl_inference.protocol.generated import model_config_pb2 as mc

log = logging.getLogger(__name__)


class CaffeBackend(OnnxRuntimeBackend):
    """Converts ``*.prototxt`` + ``*.caffemodel`` to ONNX (once per content), then runs it like ONNX."""

    def load(
        self, version_dir: Path, config: mc.ModelConfig, device: str = "cpu", device_id: int | None = None
    ) -> mc.ModelConfig:
        pair = find_caffe_files(Path(version_dir))
        if pair is None:
            raise NotFound(f"model '{config.name}': no .prototxt + .caffemodel in {version_dir}")
        onnx_path = converted_model(*pair, preprocess_from_config(config))
        onnx_config = mc.ModelConfig()
        onnx_config.CopyFrom(config)
        onnx_config.default_model_filename = onnx_path.name
        onnx_config.backend = "onnxruntime"
        onnx_config.platform = ""
        completed = super().load(onnx_path.parent, onnx_config, device, device_id)
        completed.default_model_filename = config.default_model_filename
        completed.backend = "caffe"
        completed.platform = "caffe"
        return completed
