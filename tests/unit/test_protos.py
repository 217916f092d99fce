"""Tests for protos/*.proto and the generated code in dl_inference/protocol/generated.

Our schema must stay wire- and text-format-compatible with Triton's, so it is
compared against the descriptors shipped in ``tritonclient``.

Because both files are named ``model_config.proto`` / ``grpc_service.proto``
in package ``inference``, the protobuf runtime deduplicates them when both
modules are imported into one process (allowed only because the file
descriptors are equal), and ``tritonclient``'s classes then *are* ours. To
keep the comparisons meaningful no matter what was imported first, most
checks load each side's serialized file descriptor (read from the generated
source) into its own private ``DescriptorPool``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, ServiceDescriptor

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "dl_inference" / "protocol" / "generated"
GEN_SCRIPT = ROOT / "scripts" / "gen_protos.py"

# Our generated module -> the tritonclient module built from the same .proto.
MODULE_PAIRS = {
    "model_config_pb2": "tritonclient.grpc.model_config_pb2",
    "grpc_service_pb2": "tritonclient.grpc.service_pb2",
}


# --------------------------------------------------------------------------- helpers


def _serialized_file(source: Path) -> bytes:
    """The serialized FileDescriptorProto embedded in a protoc-generated *_pb2.py."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
        ):
            return ast.literal_eval(node.args[0])
    raise AssertionError(f"no AddSerializedFile(...) call in {source}")


def _file_protos(sources: list[Path]) -> list[descriptor_pb2.FileDescriptorProto]:
    return [descriptor_pb2.FileDescriptorProto.FromString(_serialized_file(s)) for s in sources]


def _private_pool(sources: list[Path]) -> descriptor_pool.DescriptorPool:
    """A fresh pool holding the given generated modules' files (dependencies first)."""
    pool = descriptor_pool.DescriptorPool()
    for fdp in _file_protos(sources):
        pool.Add(fdp)
    return pool


def _our_sources() -> list[Path]:
    return [GENERATED / f"{name}.py" for name in MODULE_PAIRS]


def _triton_sources() -> list[Path]:
    # Locate the files without importing tritonclient.grpc: if our schema ever
    # diverged, that import would fail with a duplicate-file error and hide the diff.
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tritonclient is not installed")
    base = Path(next(iter(spec.submodule_search_locations))) / "grpc"
    sources = [base / f"{module.rsplit('.', 1)[1]}.py" for module in MODULE_PAIRS.values()]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        pytest.skip(f"tritonclient gRPC modules not found: {missing}")
    return sources


@pytest.fixture(scope="module")
def our_pool() -> descriptor_pool.DescriptorPool:
    return _private_pool(_our_sources())


@pytest.fixture(scope="module")
def triton_pool() -> descriptor_pool.DescriptorPool:
    return _private_pool(_triton_sources())


def _cls(pool: descriptor_pool.DescriptorPool, name: str):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))


def _label(f: FieldDescriptor) -> str:
    if f.is_repeated:
        return "repeated"
    return "required" if f.is_required else "optional"


def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _diff_enum(a: EnumDescriptor, b: EnumDescriptor, path: str, out: list[str]) -> None:
    va = [(v.name, v.number) for v in a.values]
    vb = [(v.name, v.number) for v in b.values]
    if va != vb:
        out.append(f"{path}: enum values {va} != {vb}")


def _diff_message(a: Descriptor, b: Descriptor, path: str, out: list[str]) -> None:
    fa = [f.name for f in a.fields]
    fb = [f.name for f in b.fields]
    if fa != fb:
        out.append(f"{path}: fields {fa} != {fb}")
    for name in sorted(set(fa) & set(fb)):
        x, y = a.fields_by_name[name], b.fields_by_name[name]

        def props(f: FieldDescriptor) -> dict[str, object]:
            return {
                "number": f.number,
                "type": descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
                "label": _label(f),
                "map": _is_map(f),
                "message_type": f.message_type.full_name if f.message_type else None,
                "enum_type": f.enum_type.full_name if f.enum_type else None,
                "oneof": f.containing_oneof.name if f.containing_oneof else None,
                "has_presence": f.has_presence,
            }

        px, py = props(x), props(y)
        for key in px:
            if px[key] != py[key]:
                out.append(f"{path}.{name}: {key} {px[key]!r} != {py[key]!r}")

    oa = {o.name: [f.name for f in o.fields] for o in a.oneofs}
    ob = {o.name: [f.name for f in o.fields] for o in b.oneofs}
    if oa != ob:
        out.append(f"{path}: oneofs {oa} != {ob}")

    if a.GetOptions().map_entry != b.GetOptions().map_entry:
        out.append(f"{path}: map_entry differs")

    na = [t.name for t in a.nested_types]
    nb = [t.name for t in b.nested_types]
    if na != nb:
        out.append(f"{path}: nested messages {na} != {nb}")
    for name in sorted(set(na) & set(nb)):
        _diff_message(a.nested_types_by_name[name], b.nested_types_by_name[name], f"{path}.{name}", out)

    ea = [e.name for e in a.enum_types]
    eb = [e.name for e in b.enum_types]
    if ea != eb:
        out.append(f"{path}: nested enums {ea} != {eb}")
    for name in sorted(set(ea) & set(eb)):
        _diff_enum(a.enum_types_by_name[name], b.enum_types_by_name[name], f"{path}.{name}", out)


def _diff_service(a: ServiceDescriptor, b: ServiceDescriptor, out: list[str]) -> None:
    ma = [m.name for m in a.methods]
    mb = [m.name for m in b.methods]
    if ma != mb:
        out.append(f"{a.full_name}: rpcs {ma} != {mb}")
    for name in sorted(set(ma) & set(mb)):
        x, y = a.methods_by_name[name], b.methods_by_name[name]
        sx = (x.input_type.full_name, x.output_type.full_name, x.client_streaming, x.server_streaming)
        sy = (y.input_type.full_name, y.output_type.full_name, y.client_streaming, y.server_streaming)
        if sx != sy:
            out.append(f"{a.full_name}.{name}: {sx} != {sy}")


# --------------------------------------------------------------------------- (a) freshness


def test_generated_code_is_up_to_date() -> None:
    pytest.importorskip("grpc_tools")
    proc = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        "dl_inference/protocol/generated is stale; run `python scripts/gen_protos.py`\n" + proc.stdout + proc.stderr
    )


def test_generated_package_imports_and_basic_shape() -> None:
    from dl_inference.protocol.generated import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2

    assert model_config_pb2.TYPE_FP32 == 11
    assert model_config_pb2.DataType.Name(13) == "TYPE_STRING"
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert len(service.methods) == 20
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    assert stream.input_type.full_name == "inference.ModelInferRequest"
    assert stream.output_type.full_name == "inference.ModelStreamInferResponse"
    assert hasattr(grpc_service_pb2_grpc, "GRPCInferenceServiceServicer")
    assert hasattr(grpc_service_pb2_grpc, "add_GRPCInferenceServiceServicer_to_server")


# --------------------------------------------------------------------------- (b) schema


def test_schema_matches_tritonclient(our_pool, triton_pool) -> None:
    problems: list[str] = []
    for ours_fdp, theirs_fdp in zip(_file_protos(_our_sources()), _file_protos(_triton_sources()), strict=True):
        assert ours_fdp.name == theirs_fdp.name
        assert ours_fdp.package == theirs_fdp.package == "inference"
        ours = our_pool.FindFileByName(ours_fdp.name)
        theirs = triton_pool.FindFileByName(theirs_fdp.name)

        for kind, a, b in (
            ("messages", ours.message_types_by_name, theirs.message_types_by_name),
            ("enums", ours.enum_types_by_name, theirs.enum_types_by_name),
            ("services", ours.services_by_name, theirs.services_by_name),
        ):
            if list(a) != list(b):
                problems.append(f"{ours.name}: top-level {kind} {list(a)} != {list(b)}")
        for name in sorted(set(ours.message_types_by_name) & set(theirs.message_types_by_name)):
            _diff_message(ours.message_types_by_name[name], theirs.message_types_by_name[name], name, problems)
        for name in sorted(set(ours.enum_types_by_name) & set(theirs.enum_types_by_name)):
            _diff_enum(ours.enum_types_by_name[name], theirs.enum_types_by_name[name], name, problems)
        for name in sorted(set(ours.services_by_name) & set(theirs.services_by_name)):
            _diff_service(ours.services_by_name[name], theirs.services_by_name[name], problems)

    assert not problems, "schema differs from tritonclient's:\n" + "\n".join(problems)


def test_file_descriptors_equal_tritonclient() -> None:
    """Stricter than the structural check: the whole FileDescriptorProto (declaration
    order, rpc options, ...) must match, otherwise importing dl_inference and
    tritonclient in one process fails with a duplicate-file error."""
    for ours, theirs in zip(_file_protos(_our_sources()), _file_protos(_triton_sources()), strict=True):
        assert ours == theirs, f"{ours.name} descriptor differs from tritonclient's"


@pytest.mark.parametrize("order", ["ours_first", "triton_first"])
def test_coexists_with_tritonclient_in_one_process(order: str) -> None:
    _triton_sources()  # skip if tritonclient is missing
    imports = [
        "import dl_inference.protocol.generated.grpc_service_pb2_grpc",
        "import tritonclient.grpc",
    ]
    if order == "triton_first":
        imports.reverse()
    proc = subprocess.run(
        [sys.executable, "-c", "; ".join(imports)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, (
        "importing our generated modules next to tritonclient's failed; the file "
        "descriptors must be identical:\n" + proc.stderr
    )


# --------------------------------------------------------------------------- (c) round trips


@pytest.fixture(params=["modules", "private-pools"])
def class_source(request, our_pool, triton_pool):
    """Returns name -> (ours, theirs) message classes, taken either from the importable
    modules or built from each side's descriptors in private pools."""

    def get(name: str):
        if request.param == "private-pools":
            return _cls(our_pool, name), _cls(triton_pool, name)
        from dl_inference.protocol.generated import grpc_service_pb2, model_config_pb2

        tc_service = pytest.importorskip("tritonclient.grpc.service_pb2")
        tc_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")
        ours_mod = grpc_service_pb2 if hasattr(grpc_service_pb2, name) else model_config_pb2
        theirs_mod = tc_service if hasattr(tc_service, name) else tc_config
        return getattr(ours_mod, name), getattr(theirs_mod, name)

    return get


def _triton_infer_request(cls):
    req = cls(model_name="resnet50", model_version="3", id="req-42")
    req.parameters["sequence_id"].int64_param = 7
    req.parameters["sequence_start"].bool_param = True
    req.parameters["priority"].uint64_param = 2
    req.parameters["custom"].string_param = "x"
    req.parameters["scale"].double_param = 0.5

    img = req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 3, 2, 2])
    img.parameters["binary_data_size"].int64_param = 48
    txt = req.inputs.add(name="TEXT", datatype="BYTES", shape=[2])
    txt.contents.bytes_contents.extend([b"hello", b"\x00\xffworld"])
    ids = req.inputs.add(name="IDS", datatype="INT64", shape=[3])
    ids.contents.int64_contents.extend([1, -2, 3])

    out = req.outputs.add(name="OUTPUT0")
    out.parameters["classification"].int64_param = 5
    req.raw_input_contents.append(bytes(range(48)))
    return req


def _check_infer_request(req) -> None:
    assert (req.model_name, req.model_version, req.id) == ("resnet50", "3", "req-42")
    assert req.parameters["sequence_id"].WhichOneof("parameter_choice") == "int64_param"
    assert req.parameters["sequence_id"].int64_param == 7
    assert req.parameters["sequence_start"].bool_param is True
    assert req.parameters["priority"].uint64_param == 2
    assert req.parameters["custom"].string_param == "x"
    assert req.parameters["scale"].double_param == 0.5
    assert [i.name for i in req.inputs] == ["INPUT0", "TEXT", "IDS"]
    assert list(req.inputs[0].shape) == [1, 3, 2, 2]
    assert req.inputs[0].parameters["binary_data_size"].int64_param == 48
    assert list(req.inputs[1].contents.bytes_contents) == [b"hello", b"\x00\xffworld"]
    assert list(req.inputs[2].contents.int64_contents) == [1, -2, 3]
    assert req.outputs[0].name == "OUTPUT0"
    assert req.outputs[0].parameters["classification"].int64_param == 5
    assert list(req.raw_input_contents) == [bytes(range(48))]


def test_infer_request_round_trip(class_source) -> None:
    ours_cls, theirs_cls = class_source("ModelInferRequest")

    # tritonclient -> ours
    wire = _triton_infer_request(theirs_cls).SerializeToString(deterministic=True)
    ours = ours_cls.FromString(wire)
    _check_infer_request(ours)
    assert ours.SerializeToString(deterministic=True) == wire

    # ours -> tritonclient
    wire = _triton_infer_request(ours_cls).SerializeToString(deterministic=True)
    theirs = theirs_cls.FromString(wire)
    _check_infer_request(theirs)
    assert theirs.SerializeToString(deterministic=True) == wire
    assert text_format.MessageToString(theirs) == text_format.MessageToString(ours)


CONFIG_PBTXT = textwrap.dedent(
    """\
    name: "resnet50"
    platform: "onnxruntime_onnx"
    backend: "onnxruntime"
    max_batch_size: 8
    version_policy: { specific: { versions: [1, 3] } }
    input [
      {
        name: "INPUT0"
        data_type: TYPE_FP32
        format: FORMAT_NCHW
        dims: [ 3, 224, 224 ]
        reshape: { shape: [ 1, 3, 224, 224 ] }
      },
      {
        name: "MASK"
        data_type: TYPE_BOOL
        dims: [ -1 ]
        optional: true
        allow_ragged_batch: true
      }
    ]
    output [
      {
        name: "OUTPUT0"
        data_type: TYPE_FP32
        dims: [ 1000 ]
        reshape { shape: [ 1, 1000 ] }
        label_filename: "labels.txt"
      }
    ]
    dynamic_batching {
      preferred_batch_size: [ 4, 8 ]
      max_queue_delay_microseconds: 100
      preserve_ordering: true
      priority_levels: 2
      default_priority_level: 1
      default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 5000 }
      priority_queue_policy {
        key: 1
        value: { timeout_action: REJECT max_queue_size: 16 allow_timeout_override: true }
      }
    }
    instance_group [
      { name: "gpu_group" kind: KIND_GPU count: 2 gpus: [ 0, 1 ] },
      {
        kind: KIND_CPU
        count: 1
        rate_limiter { resources [ { name: "R1" count: 4 } ] priority: 1 }
      }
    ]
    optimization {
      priority: PRIORITY_MAX
      execution_accelerators {
        gpu_execution_accelerator : [
          { name : "tensorrt" parameters { key: "precision_mode" value: "FP16" } }
        ]
      }
      input_pinned_memory { enable: false }
    }
    parameters { key: "intra_op_thread_count" value: { string_value: "4" } }
    parameters [
      { key: "enable_mem_arena" value: { string_value: "1" } }
    ]
    model_warmup [
      {
        name: "random_warmup"
        batch_size: 2
        count: 3
        inputs {
          key: "INPUT0"
          value: { data_type: TYPE_FP32 dims: [ 3, 224, 224 ] random_data: true }
        }
        inputs {
          key: "MASK"
          value: { data_type: TYPE_BOOL dims: [ 5 ] zero_data: true }
        }
      }
    ]
    model_transaction_policy { decoupled: false }
    response_cache { enable: true }
    """
)


def test_config_pbtxt_parses(class_source) -> None:
    ours_cls, theirs_cls = class_source("ModelConfig")
    cfg = text_format.Parse(CONFIG_PBTXT, ours_cls())

    assert cfg.name == "resnet50" and cfg.max_batch_size == 8
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert cfg.version_policy.WhichOneof("policy_choice") == "specific"
    assert list(cfg.version_policy.specific.versions) == [1, 3]

    inp = cfg.input[0]
    assert inp.data_type == 11  # TYPE_FP32
    assert list(inp.dims) == [3, 224, 224] and list(inp.reshape.shape) == [1, 3, 224, 224]
    assert cfg.input[1].optional and list(cfg.input[1].dims) == [-1]
    assert cfg.output[0].label_filename == "labels.txt"

    db = cfg.dynamic_batching
    assert list(db.preferred_batch_size) == [4, 8] and db.max_queue_delay_microseconds == 100
    assert db.default_queue_policy.default_timeout_microseconds == 5000
    assert db.priority_queue_policy[1].max_queue_size == 16

    assert [g.count for g in cfg.instance_group] == [2, 1]
    assert list(cfg.instance_group[0].gpus) == [0, 1]
    assert cfg.instance_group[1].rate_limiter.resources[0].count == 4
    accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.parameters["precision_mode"] == "FP16"

    assert {k: v.string_value for k, v in cfg.parameters.items()} == {
        "intra_op_thread_count": "4",
        "enable_mem_arena": "1",
    }
    warm = cfg.model_warmup[0]
    assert (warm.batch_size, warm.count) == (2, 3)
    assert warm.inputs["INPUT0"].WhichOneof("input_data_type") == "random_data"
    assert warm.inputs["MASK"].WhichOneof("input_data_type") == "zero_data"
    assert cfg.response_cache.enable

    # Same bytes and same text as tritonclient's parse of the same file.
    theirs = text_format.Parse(CONFIG_PBTXT, theirs_cls())
    assert cfg.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    assert text_format.MessageToString(cfg) == text_format.MessageToString(theirs)
    # And our text output parses back to the same message.
    again = text_format.Parse(text_format.MessageToString(cfg), ours_cls())
    assert again == cfg
