"""ONNX external data must stay in the model's directory.

An ONNX file may keep tensors in other files, named by a ``location`` relative to the model file. A
location that is absolute, climbs out with ``..`` or goes through a link to elsewhere would let a model
read any file the worker can (a model-load path traversal, as in Triton's CVEs). Recent ONNX Runtime
releases refuse such paths themselves (1.32 does); this check does not depend on that.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx

from dl_inference.errors import InvalidArgument
from dl_inference.repository.scan import resolve_inside


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def external_locations(model: onnx.ModelProto) -> Iterator[tuple[str, str]]:
    """``(tensor name, location)`` of every tensor of ``model`` stored outside the file."""
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            yield tensor.name, entries.get("location", "")
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t") and attr.t.data_location == onnx.TensorProto.EXTERNAL:
                    entries = {e.key: e.value for e in attr.t.external_data}
                    yield attr.t.name, entries.get("location", "")


def check_external_data(model_path: Path, model_name: str) -> None:
    """InvalidArgument naming the tensor when an external-data location leaves ``model_path``'s directory.

    A file that does not parse as ONNX is left to the runtime, which reports it in its own words.
    """
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return
    base = Path(model_path).parent
    for tensor, location in external_locations(model):
        if not location:
            raise InvalidArgument(f"model '{model_name}': tensor '{tensor}' is stored externally but names no file")
        try:
            resolve_inside(base, location)
        except InvalidArgument:
            raise InvalidArgument(
                f"model '{model_name}': tensor '{tensor}' keeps its data in '{location}', outside the model's "
                f"directory {base}; external data must be in that directory"
            ) from None
