"""A small ONNX Runtime inference runtime for MLServer, used by ``load_tests.compare_mlserver``.

MLServer ships no ONNX Runtime inference runtime of its own, so this is the one the
comparison serves its models with. It runs inside MLServer's venv (``make mlserver-env`` ->
``.venv-mlserver``), never inside ours: it imports only ``mlserver``, ``onnxruntime`` and ``numpy``.

``model-settings.json`` of a model served with it::

    {"name": "simple", "implementation": "load_tests.mlserver_runtime.OnnxRuntimeModel",
     "parameters": {"uri": "/abs/path/model.onnx"}}

(``load_tests`` must be importable: the compare script starts MLServer with ``PYTHONPATH`` set to
the repository root.)

* ``load()`` creates an ``onnxruntime.InferenceSession`` with the session options dl_inference's
  workers use by default (``intra_op_num_threads=1``, ``inter_op_num_threads=1``, sequential
  execution, spinning off, ``ORT_ENABLE_ALL``, CPU provider) and publishes the model's inputs and
  outputs as MLServer metadata (V2 datatypes, ``-1`` for dynamic dimensions), so V2 clients such as
  ``load_tests.loadgen`` can read names, datatypes and shapes from ``ModelMetadata``.
* ``predict()`` decodes each V2 input with MLServer's ``NumpyCodec`` (the request's ``data``, which
  MLServer has already filled from ``raw_input_contents`` for gRPC) and answers with every model
  output (or those the request names) encoded by ``NumpyCodec``. BYTES inputs are the exception:
  ``NumpyCodec`` decodes BYTES as fixed-width ``S<n>`` with ``n`` = the last dimension, which breaks
  on variable-length elements, so they become an object array of UTF-8 ``str`` instead (ONNX
  Runtime's string tensors), as dl_inference's backend does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor, RequestInput, ResponseOutput
from mlserver.utils import get_model_uri

# ONNX Runtime's type strings -> V2 datatypes. This module runs inside MLServer's own venv, where
# dl_inference is not installed, so it repeats this table and the session options of
# dl_inference.backends.onnxruntime_backend / load_tests.bare_server instead of importing them.
ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def session_options() -> ort.SessionOptions:
    """The options dl_inference's ONNX Runtime workers use by default (one thread, no spinning)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def _metadata(args: list[Any]) -> list[MetadataTensor]:
    return [
        MetadataTensor(
            name=a.name,
            datatype=ORT_TO_V2.get(a.type, "BYTES"),
            shape=[d if isinstance(d, int) and d >= 0 else -1 for d in a.shape],
        )
        for a in args
    ]


def decode_bytes(request_input: RequestInput) -> np.ndarray:
    """A BYTES input as an object array of ``str``, as ONNX Runtime string tensors want.

    Elements arrive as ``bytes`` (gRPC raw contents) or ``str`` (JSON); ONNX Runtime would turn a
    ``bytes`` object into its repr (``"b'..'"``), so they are decoded as UTF-8 (what dl_inference's
    ONNX Runtime backend does too)."""
    data = getattr(request_input.data, "root", request_input.data)
    flat = np.empty(len(data), dtype=object)
    flat[:] = [item.decode("utf-8") if isinstance(item, bytes) else item for item in data]
    return flat.reshape(request_input.shape)


class OnnxRuntimeModel(MLModel):
    """Serves one ONNX file with onnxruntime on CPU."""

    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        self._session = ort.InferenceSession(uri, sess_options=session_options(), providers=["CPUExecutionProvider"])
        self._input_types = {a.name: ORT_TO_V2.get(a.type) for a in self._session.get_inputs()}
        self._output_names = [o.name for o in self._session.get_outputs()]
        self.inputs = _metadata(self._session.get_inputs())
        self.outputs = _metadata(self._session.get_outputs())
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds: dict[str, np.ndarray] = {}
        for request_input in payload.inputs:
            if request_input.datatype == "BYTES":
                feeds[request_input.name] = decode_bytes(request_input)
            else:
                feeds[request_input.name] = NumpyCodec.decode_input(request_input)
        wanted = [o.name for o in payload.outputs] if payload.outputs else self._output_names
        results = self._session.run(wanted, feeds)
        outputs: list[ResponseOutput] = [
            NumpyCodec.encode_output(name, np.asarray(value)) for name, value in zip(wanted, results)
        ]
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id, outputs=outputs)
