"""Property-based fuzzing of the worker's request path: ``ModelRunner.prepare`` (parse a serialized
ModelInferRequest, validate it against the model config, decode its tensors) and ``execute``.

The runner wraps a tiny in-memory backend (outputs are the inputs), so every datatype, reshape,
optional inputs and both batching modes are covered without a model file. Property: ``prepare``
returns tensors that match the config or raises a client error (4xx); ``execute`` of what was
prepared answers every request with a response that parses, or a client error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dl_inference.backends.base import Backend
from dl_inference.protocol.datatypes import numpy_dtype, v2_to_config
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.protocol.tensors import response_to_numpy
from dl_inference.worker.runner import ModelRunner, Prepared
from tests.fuzz.strategies import check_client_error, infer_requests, mutated_bytes, pb_datatypes, pb_shapes, raw_for

# (name, datatype, dims, reshape, optional) of the fake model's inputs; output "out_<name>" echoes each.
TENSORS: list[tuple[str, str, list[int], list[int] | None, bool]] = [
    ("a", "FP32", [2], None, False),
    ("b", "BYTES", [-1], None, True),
    ("c", "INT8", [2, 2], [4], True),
    ("d", "BF16", [-1], None, True),
    ("e", "BOOL", [1], None, True),
    ("f", "UINT64", [-1, 3], None, True),
]
NAMES = [t[0] for t in TENSORS]


class EchoBackend(Backend):
    """Outputs ``out_<x>`` = input ``x``; inputs that were not given come out empty."""

    name = "echo"

    def __init__(self, config: mc.ModelConfig) -> None:
        self.config = config

    def load(self, version_dir: Path, config: mc.ModelConfig, device: str = "cpu", device_id: int | None = None) -> Any:
        return config

    def infer(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        rows = len(next(iter(inputs.values()))) if self.config.max_batch_size else None
        out = {}
        for name in output_names:
            src = name.removeprefix("out_")
            if src in inputs:
                out[name] = np.asarray(inputs[src])
            else:
                dtype = numpy_dtype(next(t[1] for t in TENSORS if t[0] == src))
                out[name] = np.zeros((rows or 0, 0), dtype=dtype)
        return out

    def unload(self) -> None:
        pass


def make_runner(max_batch_size: int) -> ModelRunner:
    config = mc.ModelConfig(name="fz", backend="echo", max_batch_size=max_batch_size)
    for name, datatype, dims, reshape, optional in TENSORS:
        inp = config.input.add(name=name, data_type=mc.DataType.Value(v2_to_config(datatype)), dims=dims)
        inp.optional = optional
        if reshape is not None:
            inp.reshape.shape.extend(reshape)
        config.output.add(name=f"out_{name}", data_type=inp.data_type, dims=[-1] if reshape else dims)
    return ModelRunner(EchoBackend(config), config, "1")


RUNNERS = {"batching": make_runner(4), "no_batching": make_runner(0)}


def _valid_request(batching: bool) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="fz", id="r")
    lead = [2] if batching else []
    request.inputs.add(name="a", datatype="FP32", shape=[*lead, 2])
    request.raw_input_contents.append(np.arange(2 * (2 if batching else 1), dtype=np.float32).tobytes())
    request.inputs.add(name="c", datatype="INT8", shape=[*lead, 2, 2])
    request.raw_input_contents.append(bytes(range(4 * (2 if batching else 1))))
    return request


VALID = {mode: _valid_request(mode == "batching").SerializeToString() for mode in RUNNERS}


def prepare_and_check(runner: ModelRunner, payload: bytes) -> Prepared | None:
    try:
        prepared = runner.prepare(payload)
    except Exception as exc:
        check_client_error(exc)
        return None
    lead = runner.max_batch_size > 0
    for name, arr in prepared.inputs.items():
        spec = runner.inputs[name]
        assert arr.dtype == numpy_dtype(spec.datatype)
        dims = list(spec.reshape if spec.reshape is not None else spec.dims)
        shape = list(arr.shape[1:] if lead else arr.shape)
        assert len(shape) == len(dims) and all(d in (-1, s) for d, s in zip(dims, shape)), (name, arr.shape)
        if lead:
            assert arr.shape[0] == prepared.rows and 1 <= prepared.rows <= runner.max_batch_size
    assert set(prepared.outputs) <= set(runner.outputs)
    return prepared


def execute_and_check(runner: ModelRunner, batch: list[Prepared]) -> None:
    outcomes, _ = runner.execute(batch)
    assert len(outcomes) == len(batch)
    for (body, error), item in zip(outcomes, batch):
        if error is not None:
            check_client_error(error)
            continue
        assert body is not None
        response = pb.ModelInferResponse.FromString(body)
        assert response.id == item.request_id
        outputs = response_to_numpy(response)
        assert list(outputs) == item.outputs


def _with_a(batching: bool, name: str, datatype: str, shape: list[int], raw: bytes = b"") -> pb.ModelInferRequest:
    """A request with a valid required input ``a`` (1 row) plus the tensor given."""
    request = pb.ModelInferRequest(model_name="fz")
    request.inputs.add(name="a", datatype="FP32", shape=[1, 2] if batching else [2])
    request.raw_input_contents.append(b"\x00" * 8)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _duplicate_outputs() -> pb.ModelInferRequest:
    request = _with_a(False, "e", "BOOL", [1], b"\x01")
    request.outputs.add(name="out_a")
    request.outputs.add(name="out_a")
    return request


@st.composite
def runner_requests(draw: st.DrawFn, batching: bool) -> pb.ModelInferRequest:
    """A valid request for the fake model with one tensor added or replaced, valid or not."""
    request = pb.ModelInferRequest.FromString(VALID["batching" if batching else "no_batching"])
    if draw(st.booleans()):
        return draw(infer_requests(names_pool=NAMES))
    name, datatype, dims, _reshape, _ = draw(st.sampled_from(TENSORS))
    if draw(st.integers(0, 4)) == 0:
        datatype = draw(pb_datatypes)
    rows = draw(st.integers(0, 5)) if batching else None
    shape = [d if d >= 0 else draw(st.integers(0, 3)) for d in dims]
    if rows is not None:
        shape = [rows, *shape]
    if draw(st.integers(0, 3)) == 0:
        shape = draw(pb_shapes)
    raw = draw(raw_for(datatype, shape))
    names_now = [t.name for t in request.inputs]
    if name in names_now and draw(st.booleans()):
        i = names_now.index(name)
        del request.inputs[i]
        del request.raw_input_contents[i]
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    if draw(st.booleans()):
        for out in draw(st.lists(st.sampled_from([f"out_{n}" for n in NAMES] + ["zz", ""]), max_size=3)):
            request.outputs.add(name=out)
    return request


@pytest.mark.parametrize("mode", list(RUNNERS))
@given(data=st.data())
def test_prepare_arbitrary_payloads(mode: str, data: st.DataObject) -> None:
    runner = RUNNERS[mode]
    payload = data.draw(
        st.binary(max_size=120)
        | mutated_bytes(VALID[mode])
        | infer_requests(names_pool=["fz", *NAMES]).map(lambda r: r.SerializeToString()),
        label="payload",
    )
    prepare_and_check(runner, payload)


@pytest.mark.parametrize("mode", list(RUNNERS))
@given(data=st.data())
def test_prepare_then_execute(mode: str, data: st.DataObject) -> None:
    runner = RUNNERS[mode]
    batching = mode == "batching"
    requests = data.draw(st.lists(runner_requests(batching), min_size=1, max_size=3), label="requests")
    prepare_then_execute(runner, requests)


@given(request=st.booleans().flatmap(runner_requests))
# Regressions: before the fix each raised numpy's MemoryError/ValueError out of prepare(), which the
# worker logged without answering: the client's request hung.
@example(request=_with_a(True, "b", "BYTES", [1, 2**40]))  # 8 TiB object array for a 0-byte tensor
@example(request=_with_a(False, "b", "BYTES", [2**40]))
@example(request=_with_a(True, "f", "UINT64", [1, 2**62, 0]))  # dims multiply beyond 2**63 (0 elements)
@example(request=_with_a(False, "f", "UINT64", [2**62, 4, 0]))
@example(request=_with_a(False, "b", "BYTES", [2**33, 2**33], b"\x00" * 4))  # count beyond numpy's limit
# Regression: the same output requested twice came back twice in the gRPC response (HTTP refused it).
@example(request=_duplicate_outputs())
def test_prepare_one_request_on_both_runners(request: pb.ModelInferRequest) -> None:
    for runner in RUNNERS.values():
        prepare_then_execute(runner, [request])


def prepare_then_execute(runner: ModelRunner, requests: list[pb.ModelInferRequest]) -> None:
    prepared = []
    for request in requests:
        item = prepare_and_check(runner, request.SerializeToString())
        if item is not None:
            prepared.append(item)
    if not prepared:
        return
    execute_and_check(runner, prepared[:1])
    assert len(set(prepared[0].outputs)) == len(prepared[0].outputs)
    same_key = [p for p in prepared if p.key == prepared[0].key]
    if len(same_key) > 1 and sum(p.rows for p in same_key) <= runner.max_batch_size:
        execute_and_check(runner, same_key)  # what the batcher would form


@pytest.mark.parametrize("mode", list(RUNNERS))
def test_valid_request_runs(mode: str) -> None:
    runner = RUNNERS[mode]
    prepared = prepare_and_check(runner, VALID[mode])
    assert prepared is not None and set(prepared.inputs) == {"a", "c"}
    execute_and_check(runner, [prepared])
