"""handler.py around real backends (ONNX Runtime, PyTorch), driven through the worker's load and runner."""

from __future__ import annotations

import io
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dl_inference.errors import Code, ServerError
from dl_inference.examples import COLOURS, make_example_repository
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.tensors import response_to_numpy, serialize_bytes_tensor, tensor_to_raw
from dl_inference.worker.handler import find_handler
from dl_inference.worker.loader import LoadedModel, load_model_version

DOUBLE_ONNX = helper.make_model(
    helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    ),
    opset_imports=[helper.make_opsetid("", 17)],
    ir_version=8,
)

# Clients send 'text' (BYTES "a,b,c,d"); the model doubles the numbers; clients get 'total' (FP32).
CLIENT_CONFIG = """
name: "m"
backend: "onnxruntime"
max_batch_size: 8
input { name: "text" data_type: TYPE_STRING dims: [1] }
output { name: "total" data_type: TYPE_FP32 dims: [1] }
parameters { key: "offset" value { string_value: "0" } }
"""

HANDLER = """
import numpy as np
from dl_inference.errors import InvalidArgument

CALLS = []

def preprocess(inputs, parameters):
    CALLS.append(("pre", len(inputs["text"]), dict(parameters)))
    rows = [bytes(b).decode() for b in inputs["text"].reshape(-1)]
    if any(r == "server-error" for r in rows):
        raise InvalidArgument("custom message from the handler")
    return {"x": np.array([[float(v) for v in r.split(",")] for r in rows], dtype=np.float32)}

def postprocess(outputs, parameters):
    if parameters.get("explode"):
        raise RuntimeError("postprocess blew up")
    total = outputs["y"].sum(axis=1, keepdims=True) + float(parameters["offset"])
    if parameters.get("wrong_shape"):
        return {"total": total.reshape(-1)}
    return {"total": total.astype(np.float64)}  # cast back to FP32 by the runner
"""


def _repo(tmp_path: Path, handler: str, config: str = CLIENT_CONFIG, where: str = "model") -> Path:
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    onnx.save(DOUBLE_ONNX, model_dir / "1" / "model.onnx")
    (model_dir / "config.pbtxt").write_text(config)
    target = model_dir / "1" if where == "version" else model_dir
    (target / "handler.py").write_text(textwrap.dedent(handler))
    return tmp_path


def _request(rows: list[bytes], name: str = "m", **params: object) -> bytes:
    req = pb.ModelInferRequest(model_name=name, id="r")
    req.inputs.add(name="text", datatype="BYTES", shape=[len(rows), 1])
    req.raw_input_contents.append(serialize_bytes_tensor(np.array(rows, dtype=object)))
    for key, value in params.items():
        if isinstance(value, bool):
            req.parameters[key].bool_param = value
        elif isinstance(value, int):
            req.parameters[key].int64_param = value
        else:
            req.parameters[key].string_param = str(value)
    return req.SerializeToString()


def _run(loaded: LoadedModel, *payloads: bytes) -> list[dict[str, np.ndarray] | ServerError]:
    prepared = [loaded.runner.prepare(p) for p in payloads]
    outcomes, _ = loaded.runner.execute(prepared)
    results: list[dict[str, np.ndarray] | ServerError] = []
    for body, error in outcomes:
        if error is not None:
            results.append(error)
        else:
            assert body is not None
            results.append(response_to_numpy(pb.ModelInferResponse.FromString(body)))
    return results


@pytest.fixture
def loaded(tmp_path: Path) -> Iterator[LoadedModel]:
    model = load_model_version(_repo(tmp_path, HANDLER), "m", None)
    yield model
    model.runner.close()


def test_find_handler_prefers_the_version_directory(tmp_path: Path) -> None:
    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    assert find_handler(version) is None
    (tmp_path / "m" / "handler.py").write_text("")
    assert find_handler(version) == tmp_path / "m" / "handler.py"
    (version / "handler.py").write_text("")
    assert find_handler(version) == version / "handler.py"


def test_client_config_outside_backend_tensors_inside(loaded: LoadedModel) -> None:
    assert [(t.name, t.data_type) for t in loaded.config.input] == [("text", 13)]  # TYPE_STRING
    assert [t.name for t in loaded.config.output] == ["total"]
    assert loaded.config.max_batch_size == 8
    handler = loaded.runner.handler
    assert handler is not None
    assert handler.model.input_names == ["x"] and handler.model.output_names == ["y"]


def test_batched_requests_pass_through_the_handler(loaded: LoadedModel) -> None:
    out = _run(loaded, _request([b"1,2,3,4", b"0,0,0,1"]), _request([b"1,1,1,1"]))
    assert isinstance(out[0], dict) and isinstance(out[1], dict)
    np.testing.assert_array_equal(out[0]["total"], np.array([[20.0], [2.0]], dtype=np.float32))
    assert out[0]["total"].dtype == np.float32  # float64 from postprocess, cast to the config's FP32
    np.testing.assert_array_equal(out[1]["total"], [[8.0]])
    calls = loaded.runner.handler.module.CALLS  # type: ignore[union-attr]
    assert calls == [("pre", 3, {"offset": "0"})]  # one preprocess call for the whole batch


def test_request_parameters_override_config_and_split_batches(loaded: LoadedModel) -> None:
    plain = loaded.runner.prepare(_request([b"1,1,1,1"]))
    shifted = loaded.runner.prepare(_request([b"1,1,1,1"], offset="100", priority=1, timeout=5_000_000))
    assert plain.parameters == {"offset": "0"}
    assert shifted.parameters == {"offset": "100"}  # priority/timeout are the server's, not the handler's
    assert plain.key != shifted.key  # never batched together: a handler sees one parameters dict
    (out,) = _run(loaded, _request([b"1,1,1,1"], offset="100"))
    assert isinstance(out, dict)
    np.testing.assert_array_equal(out["total"], [[108.0]])


def test_preprocess_error_fails_only_its_request(loaded: LoadedModel) -> None:
    good, bad, good2 = _run(loaded, _request([b"1,1,1,1"]), _request([b"1,x,1,1"]), _request([b"2,2,2,2"]))
    assert isinstance(good, dict) and isinstance(good2, dict)
    np.testing.assert_array_equal(good2["total"], [[16.0]])
    assert isinstance(bad, ServerError) and bad.code is Code.INVALID_ARGUMENT
    assert bad.message == ("model 'm': handler preprocess failed: ValueError: could not convert string to float: 'x'")


def test_server_error_from_handler_keeps_its_message(loaded: LoadedModel) -> None:
    (err,) = _run(loaded, _request([b"server-error"]))
    assert isinstance(err, ServerError)
    assert err.code is Code.INVALID_ARGUMENT and err.message == "custom message from the handler"


def test_postprocess_error_is_internal_and_the_runner_keeps_working(loaded: LoadedModel) -> None:
    (err,) = _run(loaded, _request([b"1,1,1,1"], explode=True))
    assert isinstance(err, ServerError) and err.code is Code.INTERNAL
    assert err.message == "model 'm': handler postprocess failed: RuntimeError: postprocess blew up"
    (ok,) = _run(loaded, _request([b"1,1,1,1"]))
    assert isinstance(ok, dict)


def test_handler_output_of_the_wrong_shape_is_named(loaded: LoadedModel) -> None:
    (err,) = _run(loaded, _request([b"1,1,1,1", b"2,2,2,2"], wrong_shape=True))
    assert isinstance(err, ServerError) and err.code is Code.INTERNAL
    assert err.message == "model 'm': output 'total': expected shape [-1,1], the handler gave [2]"


def test_custom_infer_and_missing_hooks(tmp_path: Path) -> None:
    handler = """
    import numpy as np

    def preprocess(inputs, parameters):
        return {"x": np.array([[float(v) for v in bytes(r).decode().split(",")] for r in inputs["text"].reshape(-1)],
                              dtype=np.float32)}

    def infer(model, inputs):
        first = model(inputs, ["y"])["y"]
        second = model({"x": first})["y"]  # run the backend twice: x * 4
        return {"total": second[:, :1]}
    """
    model = load_model_version(_repo(tmp_path, handler), "m", None)
    try:
        (out,) = _run(model, _request([b"1,2,3,4", b"5,6,7,8"]))
        assert isinstance(out, dict)
        np.testing.assert_array_equal(out["total"], [[4.0], [20.0]])
    finally:
        model.runner.close()


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        ("import no_such_module_anywhere", "failed to import: ModuleNotFoundError: No module named"),
        ("def initialize(context):\n    raise KeyError('labels')", "handler initialize failed: KeyError: 'labels'"),
        ("preprocess = 3", "'preprocess' must be a function"),
    ],
)
def test_a_broken_handler_fails_the_load_with_its_reason(tmp_path: Path, handler: str, message: str) -> None:
    with pytest.raises(ServerError, match="model 'm'") as info:
        load_model_version(_repo(tmp_path, handler), "m", None)
    assert message in info.value.message


def test_initialize_context_and_version_handler(tmp_path: Path) -> None:
    handler = """
    SEEN = {}

    def initialize(context):
        SEEN.update(name=context.model_name, version=context.version, dir=context.version_dir.name,
                    params=context.parameters, backend_inputs=[t.name for t in context.backend_config.input])

    def preprocess(inputs, parameters):
        import numpy as np
        return {"x": np.ones((len(inputs["text"]), 4), dtype=np.float32)}

    def postprocess(outputs, parameters):
        return {"total": outputs["y"][:, :1]}
    """
    model = load_model_version(_repo(tmp_path, handler, where="version"), "m", None)
    try:
        seen = model.runner.handler.module.SEEN  # type: ignore[union-attr]
        assert seen == {"name": "m", "version": 1, "dir": "1", "params": {"offset": "0"}, "backend_inputs": ["x"]}
    finally:
        model.runner.close()


def test_warmup_runs_through_the_handler(tmp_path: Path) -> None:
    config = (
        CLIENT_CONFIG
        + """
model_warmup { name: "w" batch_size: 2 inputs { key: "text" value { data_type: TYPE_STRING dims: [1]
  input_data_file: "row" } } }
"""
    )
    repo = _repo(tmp_path, HANDLER, config)
    (repo / "m" / "warmup").mkdir()
    (repo / "m" / "warmup" / "row").write_bytes(tensor_to_raw(np.array([b"1,2,3,4"], dtype=object), "BYTES"))
    model = load_model_version(repo, "m", None)
    try:
        assert model.runner.handler.module.CALLS == [("pre", 2, {"offset": "0"})]  # type: ignore[union-attr]
    finally:
        model.runner.close()
    (repo / "m" / "warmup" / "row").write_bytes(tensor_to_raw(np.array([b"oops"], dtype=object), "BYTES"))
    with pytest.raises(ServerError, match=r"warmup 'w' failed: .*handler preprocess failed: ValueError"):
        load_model_version(repo, "m", None)


def test_pytorch_backend_behind_a_handler(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model_dir = tmp_path / "t"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.py").write_text(
        "import torch\n\nclass Model(torch.nn.Module):\n    def forward(self, x):\n        return x * 3\n"
    )
    torch.save({}, model_dir / "1" / "model.pt")  # empty state_dict: the module has no weights
    (model_dir / "config.pbtxt").write_text(
        'name: "t"\nbackend: "pytorch"\nmax_batch_size: 4\n'
        'input { name: "text" data_type: TYPE_STRING dims: [1] }\n'
        'output { name: "total" data_type: TYPE_FP32 dims: [1] }\n'
    )
    (model_dir / "handler.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            def preprocess(inputs, parameters):
                return {"x": np.array([[float(bytes(r))] for r in inputs["text"].reshape(-1)], dtype=np.float32)}

            def postprocess(outputs, parameters):
                return {"total": outputs["output__0"]}
            """
        )
    )
    model = load_model_version(tmp_path, "t", None)
    try:
        (out,) = _run(model, _request([b"1.5", b"-2"], name="t"))
        assert isinstance(out, dict)
        np.testing.assert_array_equal(out["total"], [[4.5], [-6.0]])
    finally:
        model.runner.close()


def test_preprocess_may_hand_torch_tensors_to_the_pytorch_backend(tmp_path: Path) -> None:
    """A tensor from preprocess reaches the module as is (no numpy round trip): how GPU-decoded images
    feed the model. The module sees the very tensor the handler made, cast to the precision."""
    torch = pytest.importorskip("torch")
    model_dir = tmp_path / "t"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.py").write_text(
        "import torch\n\nSEEN = []\n\nclass Model(torch.nn.Module):\n"
        "    def forward(self, x):\n        SEEN.append(x)\n        return x * 2\n"
    )
    torch.save({}, model_dir / "1" / "model.pt")
    (model_dir / "config.pbtxt").write_text(
        'name: "t"\nbackend: "pytorch"\nmax_batch_size: 4\n'
        'input { name: "n" data_type: TYPE_INT32 dims: [1] }\n'
        'output { name: "y" data_type: TYPE_FP32 dims: [2] }\n'
    )
    (model_dir / "handler.py").write_text(
        textwrap.dedent(
            """
            import torch

            MADE = []

            def preprocess(inputs, parameters):
                x = torch.from_numpy(inputs["n"].astype("float32")).repeat(1, 2)
                MADE.append(x)
                return {"x": x}

            def postprocess(outputs, parameters):
                return {"y": outputs["output__0"]}
            """
        )
    )
    model = load_model_version(tmp_path, "t", None)
    try:
        request = pb.ModelInferRequest(model_name="t")
        request.inputs.add(name="n", datatype="INT32", shape=[2, 1])
        request.raw_input_contents.append(np.array([[3], [5]], np.int32).tobytes())
        (out,) = _run(model, request.SerializeToString())
        assert isinstance(out, dict)
        np.testing.assert_array_equal(out["y"], [[6.0, 6.0], [10.0, 10.0]])
        handler = model.runner.handler
        assert handler is not None
        net_module = sys.modules[next(k for k in sys.modules if k.startswith("dl_inference_model_t_"))]
        assert net_module.SEEN[-1] is handler.module.MADE[-1]  # same device, same dtype: not even a copy
    finally:
        model.runner.close()


def test_example_image_classifier(tmp_path: Path) -> None:
    from PIL import Image

    make_example_repository(tmp_path)
    model = load_model_version(tmp_path, "image_classifier", None)
    labels = list(COLOURS)

    def encoded(rgb: tuple[int, int, int], fmt: str, size: tuple[int, int]) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", size, rgb).save(buf, fmt)
        return buf.getvalue()

    try:
        images = [
            encoded((230, 20, 20), "PNG", (64, 48)),
            encoded((20, 20, 230), "JPEG", (17, 100)),
            encoded((250, 250, 250), "PNG", (32, 32)),
            encoded((240, 240, 10), "JPEG", (300, 200)),
        ]
        req = pb.ModelInferRequest(model_name="image_classifier")
        req.inputs.add(name="image", datatype="BYTES", shape=[4, 1])
        req.raw_input_contents.append(serialize_bytes_tensor(np.array(images, dtype=object)))
        (out,) = _run(model, req.SerializeToString())
        assert isinstance(out, dict)
        assert out["labels"].shape == (4, 3)  # top_k defaults to the config's 3
        best = [row[0].decode().split(":") for row in out["labels"]]
        assert [b[2] for b in best] == ["red", "blue", "white", "yellow"]
        assert all(labels[int(b[1])] == b[2] and 0.5 < float(b[0]) <= 1.0 for b in best)
        req.parameters["top_k"].int64_param = 9
        (err,) = _run(model, req.SerializeToString())
        assert isinstance(err, ServerError) and err.code is Code.INVALID_ARGUMENT
        assert "parameter 'top_k' must be in 1..8, got 9" in err.message
    finally:
        model.runner.close()


def test_tensor_element_and_bytes_element_limits(tmp_path: Path) -> None:
    make_example_repository(tmp_path)
    model = load_model_version(tmp_path, "simple", None, max_tensor_elements=20)
    try:
        req = pb.ModelInferRequest(model_name="simple")
        req.inputs.add(name="x", datatype="FP32", shape=[2, 16])
        req.raw_input_contents.append(np.zeros((2, 16), np.float32).tobytes())
        with pytest.raises(ServerError, match=r"input 'x': 32 elements exceed this server's limit of 20 per tensor"):
            model.runner.prepare(req.SerializeToString())
        del req.inputs[0].shape[:]
        req.inputs[0].shape.extend([1, 16])
        req.raw_input_contents[0] = np.zeros((1, 16), np.float32).tobytes()
        model.runner.prepare(req.SerializeToString())  # within the limit
    finally:
        model.runner.close()
    model = load_model_version(tmp_path, "image_classifier", None, max_bytes_element=100)
    try:
        req = pb.ModelInferRequest(model_name="image_classifier")
        req.inputs.add(name="image", datatype="BYTES", shape=[2, 1])
        req.raw_input_contents.append(serialize_bytes_tensor(np.array([b"x" * 10, b"y" * 101], dtype=object)))
        with pytest.raises(ServerError, match="a BYTES element of 101 bytes exceeds this server's limit of 100"):
            model.runner.prepare(req.SerializeToString())
    finally:
        model.runner.close()
