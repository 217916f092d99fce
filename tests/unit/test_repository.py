"""Tests for dl_inference.repository: config loading, versions, repository scanning."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from dl_inference.errors import InvalidArgument, NotFound
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.repository import (
    backend_name,
    default_model_filename,
    instance_count,
    instance_kinds,
    list_versions,
    load_model_config,
    resolve_inside,
    scan_model,
    scan_repository,
    select_versions,
    validate_config,
    validate_model_name,
)

TRITON_PBTXT = textwrap.dedent(
    """\
    name: "resnet"
    platform: "onnxruntime_onnx"
    max_batch_size: 8
    version_policy: { latest: { num_versions: 2 } }
    input [
      {
        name: "input__0"
        data_type: TYPE_FP32
        format: FORMAT_NCHW
        dims: [ 3, 224, 224 ]
      }
    ]
    output [
      {
        name: "output__0"
        data_type: TYPE_FP32
        dims: [ 1000 ]
        reshape: { shape: [ 1, 1000 ] }
      }
    ]
    instance_group [
      { count: 2 kind: KIND_GPU gpus: [ 0, 1 ] },
      { kind: KIND_CPU }
    ]
    dynamic_batching {
      preferred_batch_size: [ 4, 8 ]
      max_queue_delay_microseconds: 100
      default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 5000 max_queue_size: 16 }
    }
    parameters { key: "x" value: { string_value: "y" } }
    model_warmup [
      {
        name: "w" batch_size: 1
        inputs { key: "input__0" value: { data_type: TYPE_FP32 dims: [3, 224, 224] zero_data: true } }
      }
    ]
    """
)

YAML_CONFIG = textwrap.dedent(
    """\
    backend: pytorch
    max_batch_size: 4
    input:
      - name: x
        data_type: TYPE_FP32
        dims: [-1, 16]
    output:
      - name: y
        data_type: TYPE_INT64
        dims: [4]
    instance_group:
      - kind: KIND_CPU
        count: 3
    dynamic_batching:
      max_queue_delay_microseconds: 200
    version_policy:
      all: {}
    parameters:
      x: {string_value: "y"}
    """
)


def make_model(
    root: Path,
    name: str,
    versions: tuple[int | str, ...] = (1,),
    pbtxt: str | None = None,
    yaml_text: str | None = None,
    model_file: str = "model.onnx",
) -> Path:
    model_dir = root / name
    model_dir.mkdir(parents=True)
    if pbtxt is not None:
        (model_dir / "config.pbtxt").write_text(pbtxt)
    if yaml_text is not None:
        (model_dir / "config.yaml").write_text(yaml_text)
    for v in versions:
        (model_dir / str(v)).mkdir()
        if model_file.endswith(".savedmodel"):
            (model_dir / str(v) / model_file).mkdir()
            (model_dir / str(v) / model_file / "saved_model.pb").write_bytes(b"pb")
        else:
            (model_dir / str(v) / model_file).write_bytes(b"weights")
    return model_dir


# --------------------------------------------------------------------------- config loading


def test_triton_pbtxt_loads_unchanged(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "resnet", pbtxt=TRITON_PBTXT)
    config = load_model_config(model_dir)
    assert config.name == "resnet"
    assert config.max_batch_size == 8
    assert config.version_policy.latest.num_versions == 2
    assert [i.name for i in config.input] == ["input__0"]
    assert list(config.input[0].dims) == [3, 224, 224]
    assert config.input[0].data_type == mc.TYPE_FP32
    assert list(config.output[0].reshape.shape) == [1, 1000]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 16
    assert config.parameters["x"].string_value == "y"
    assert config.model_warmup[0].inputs["input__0"].zero_data
    validate_config(config)
    assert backend_name(config, None) == "onnxruntime"
    assert default_model_filename(config) == "model.onnx"


def test_yaml_config(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "m", yaml_text=YAML_CONFIG)
    config = load_model_config(model_dir)
    assert config.name == "m"
    assert config.backend == "pytorch"
    assert list(config.input[0].dims) == [-1, 16]
    assert config.output[0].data_type == mc.TYPE_INT64
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert config.parameters["x"].string_value == "y"
    assert config.dynamic_batching.max_queue_delay_microseconds == 200
    validate_config(config)
    assert instance_count(config) == 3


def test_yml_extension_and_empty_yaml(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.yml").write_text("")
    assert load_model_config(model_dir) == mc.ModelConfig(name="m")


def test_no_config_gives_named_empty_config(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "bare")
    assert load_model_config(model_dir) == mc.ModelConfig(name="bare")


def test_both_configs_is_an_error(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "m", pbtxt='name: "m"', yaml_text="name: m")
    with pytest.raises(InvalidArgument, match=r"more than one config file.*config\.pbtxt.*config\.yaml"):
        load_model_config(model_dir)


def test_pbtxt_parse_error_names_file_and_position(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "m", pbtxt='name: "m"\nmax_batch_size: lots\n')
    with pytest.raises(InvalidArgument) as info:
        load_model_config(model_dir)
    assert "config.pbtxt" in info.value.message
    assert "2:" in info.value.message


def test_pbtxt_unknown_field_is_an_error(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "m", pbtxt="max_batch_sise: 4\n")
    with pytest.raises(InvalidArgument, match=r"config\.pbtxt.*max_batch_sise"):
        load_model_config(model_dir)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "m", yaml_text="name: m\n  max_batch_size: 1\n")
    with pytest.raises(InvalidArgument) as info:
        load_model_config(model_dir)
    assert "config.yaml" in info.value.message
    assert "2:" in info.value.message


def test_yaml_bad_enum_and_non_mapping(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "m", yaml_text="input: [{name: x, data_type: TYPE_FP33}]\n")
    with pytest.raises(InvalidArgument, match=r"config\.yaml.*TYPE_FP33"):
        load_model_config(model_dir)
    (model_dir / "config.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(InvalidArgument, match="mapping"):
        load_model_config(model_dir)


def test_name_mismatch(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "right", pbtxt='name: "wrong"')
    with pytest.raises(InvalidArgument, match=r"'wrong'.*'right'"):
        load_model_config(model_dir)


# --------------------------------------------------------------------------- backends and files


@pytest.mark.parametrize(
    ("fields", "backend", "filename"),
    [
        ({"platform": "onnxruntime_onnx"}, "onnxruntime", "model.onnx"),
        ({"backend": "onnxruntime"}, "onnxruntime", "model.onnx"),
        ({"platform": "tensorrt_plan"}, "tensorrt", "model.plan"),
        ({"backend": "tensorrt"}, "tensorrt", "model.plan"),
        ({"platform": "pytorch_libtorch"}, "pytorch", "model.pt"),
        ({"backend": "pytorch"}, "pytorch", "model.pt"),
        ({"platform": "tensorflow_savedmodel"}, "tensorflow", "model.savedmodel"),
        ({"backend": "tensorflow"}, "tensorflow", "model.savedmodel"),
        ({"platform": "onnxruntime_onnx", "backend": "onnxruntime"}, "onnxruntime", "model.onnx"),
        ({}, "onnxruntime", "model.onnx"),
    ],
)
def test_backend_and_default_filename(fields: dict[str, Any], backend: str, filename: str) -> None:
    config = mc.ModelConfig(name="m", **fields)
    assert backend_name(config, None) == backend
    assert default_model_filename(config) == filename


def test_explicit_default_model_filename() -> None:
    config = mc.ModelConfig(name="m", platform="tensorrt_plan", default_model_filename="net.engine")
    assert default_model_filename(config) == "net.engine"
    assert backend_name(mc.ModelConfig(name="m", default_model_filename="net.engine"), None) == "tensorrt"


@pytest.mark.parametrize(
    ("model_file", "backend"),
    [
        ("model.onnx", "onnxruntime"),
        ("model.plan", "tensorrt"),
        ("model.pt", "pytorch"),
        ("model.pt2", "pytorch"),
        ("model.savedmodel", "tensorflow"),
    ],
)
def test_backend_inferred_from_files(tmp_path: Path, model_file: str, backend: str) -> None:
    model_dir = make_model(tmp_path, "m", model_file=model_file)
    assert backend_name(mc.ModelConfig(name="m"), model_dir / "1") == backend
    source = scan_model(tmp_path, "m")
    assert source.config.backend == backend


def test_backend_inference_failures(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "m", model_file="weights.bin")
    with pytest.raises(InvalidArgument, match=r"no known model file.*set 'backend'"):
        backend_name(mc.ModelConfig(name="m"), model_dir / "1")
    (model_dir / "1" / "model.onnx").write_bytes(b"")
    (model_dir / "1" / "model.pt").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="several backends"):
        backend_name(mc.ModelConfig(name="m"), model_dir / "1")


def test_unknown_or_conflicting_backend() -> None:
    with pytest.raises(InvalidArgument) as info:
        backend_name(mc.ModelConfig(name="m", backend="mxnet"))
    assert "mxnet" in info.value.message
    for supported in ("onnxruntime", "pytorch", "tensorflow", "tensorrt"):
        assert supported in info.value.message
    with pytest.raises(InvalidArgument, match="disagree"):
        backend_name(mc.ModelConfig(name="m", platform="onnxruntime_onnx", backend="pytorch"))


# --------------------------------------------------------------------------- instances


def _groups(*groups: dict) -> mc.ModelConfig:
    return mc.ModelConfig(name="m", instance_group=[mc.ModelInstanceGroup(**g) for g in groups])


def test_instance_counts_and_kinds() -> None:
    cpu, gpu = mc.ModelInstanceGroup.KIND_CPU, mc.ModelInstanceGroup.KIND_GPU
    assert instance_count(mc.ModelConfig()) == 1
    assert instance_kinds(mc.ModelConfig()) == [("KIND_AUTO", None)]
    assert instance_count(_groups({"kind": cpu, "count": 0})) == 1
    assert instance_count(_groups({"kind": cpu, "count": 3}, {"kind": cpu})) == 4
    config = _groups({"kind": gpu, "count": 2, "gpus": [0, 1]}, {"kind": cpu})
    assert instance_kinds(config) == [
        ("KIND_GPU", 0),
        ("KIND_GPU", 0),
        ("KIND_GPU", 1),
        ("KIND_GPU", 1),
        ("KIND_CPU", None),
    ]
    assert instance_count(config) == 5
    assert instance_kinds(_groups({"kind": gpu, "count": 2})) == [("KIND_GPU", None)] * 2


def test_instance_kinds_with_known_gpus() -> None:
    gpu = mc.ModelInstanceGroup.KIND_GPU
    assert instance_kinds(_groups({"kind": gpu}), gpu_ids=[0, 1]) == [("KIND_GPU", 0), ("KIND_GPU", 1)]
    assert instance_kinds(mc.ModelConfig(), gpu_ids=[3]) == [("KIND_GPU", 3)]
    assert instance_kinds(mc.ModelConfig(), gpu_ids=[]) == [("KIND_CPU", None)]


def test_pbtxt_instance_groups(tmp_path: Path) -> None:
    config = load_model_config(make_model(tmp_path, "resnet", pbtxt=TRITON_PBTXT))
    assert instance_count(config) == 5
    assert instance_kinds(config)[-1] == ("KIND_CPU", None)


# --------------------------------------------------------------------------- validation


def _tensor(
    name: str, dims: list[int], dtype: mc.DataType = mc.TYPE_FP32, reshape: list[int] | None = None
) -> mc.ModelInput:
    t = mc.ModelInput(name=name, data_type=dtype, dims=dims)
    if reshape is not None:
        t.reshape.shape.extend(reshape)
    return t


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        (mc.ModelConfig(name="m", max_batch_size=-1), "max_batch_size"),
        (mc.ModelConfig(name="m", input=[_tensor("x", [2, -2])]), "'x'.*dims"),
        (mc.ModelConfig(name="m", input=[_tensor("x", [2]), _tensor("x", [3])]), "'x'.*duplicate"),
        (mc.ModelConfig(name="m", output=[mc.ModelOutput(name="y", dims=[1])]), "'y'.*TYPE_INVALID"),
        (mc.ModelConfig(name="m", input=[_tensor("x", [2, 3], reshape=[5])]), "'x'.*reshape"),
        (mc.ModelConfig(name="m", input=[mc.ModelInput(data_type=mc.TYPE_FP32)]), "no name"),
        (_groups({"kind": mc.ModelInstanceGroup.KIND_CPU, "gpus": [0]}), "KIND_CPU cannot list gpus"),
        (_groups({"count": -1}), "count"),
        (
            mc.ModelConfig(
                name="m", max_batch_size=4, dynamic_batching=mc.ModelDynamicBatching(preferred_batch_size=[8])
            ),
            "preferred_batch_size",
        ),
    ],
)
def test_validate_config_errors(config: mc.ModelConfig, pattern: str) -> None:
    with pytest.raises(InvalidArgument, match=pattern) as info:
        validate_config(config)
    assert "model 'm'" in info.value.message


def test_validate_config_accepts_consistent_reshape() -> None:
    validate_config(mc.ModelConfig(name="m", input=[_tensor("x", [2, 3], reshape=[6])]))
    validate_config(mc.ModelConfig(name="m", input=[_tensor("x", [-1, 3], reshape=[5])]))  # not fully known
    same_name = mc.ModelOutput(name="x", data_type=mc.TYPE_FP32, dims=[1])
    validate_config(mc.ModelConfig(name="m", input=[_tensor("x", [1])], output=[same_name]))


# --------------------------------------------------------------------------- versions


def test_list_versions_ignores_non_numeric(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "m", versions=(1, 3, 10, "abc", "0", "007", "2a"))
    (model_dir / ".5").mkdir()
    (model_dir / "7").write_text("a file, not a version")
    versions = list_versions(model_dir)
    assert list(versions) == [1, 3, 10]
    assert versions[10] == model_dir / "10"


def _policy(text: str) -> mc.ModelVersionPolicy:
    from google.protobuf import text_format

    return text_format.Parse(text, mc.ModelVersionPolicy())


def test_version_policies(tmp_path: Path) -> None:
    available = {v: tmp_path / str(v) for v in (1, 2, 5, 9)}
    assert select_versions(available, None) == [9]
    assert select_versions(available, mc.ModelVersionPolicy()) == [9]
    assert select_versions(available, _policy("all {}")) == [1, 2, 5, 9]
    assert select_versions(available, _policy("latest { num_versions: 2 }")) == [5, 9]
    assert select_versions(available, _policy("latest { num_versions: 10 }")) == [1, 2, 5, 9]
    assert select_versions(available, _policy("specific { versions: [5, 1] }")) == [1, 5]
    with pytest.raises(InvalidArgument, match=r"3.*available: 1, 2, 5, 9"):
        select_versions(available, _policy("specific { versions: [1, 3] }"))
    with pytest.raises(InvalidArgument, match="num_versions"):
        select_versions(available, _policy("latest { num_versions: 0 }"))
    assert select_versions({}, None) == []


def test_scan_applies_version_policy(tmp_path: Path) -> None:
    make_model(tmp_path, "resnet", versions=(1, 2, 3), pbtxt=TRITON_PBTXT)
    make_model(tmp_path, "spec", versions=(1, 2), pbtxt="version_policy: { specific: { versions: [4] } }")
    models, errors = scan_repository(tmp_path)
    assert list(models["resnet"].versions) == [2, 3]
    assert models["resnet"].versions[3] == (tmp_path / "resnet" / "3").resolve()
    assert "spec" in errors and "4" in errors["spec"]


# --------------------------------------------------------------------------- names and paths


@pytest.mark.parametrize("name", ["", "a/b", "a\\b", "..", "a..b", ".hidden", "x\0y", "n" * 256])
def test_bad_model_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_model_name(name)


@pytest.mark.parametrize("name", ["resnet50", "my-model_v2.onnx", "a" * 255, "模型"])
def test_good_model_names(name: str) -> None:
    validate_model_name(name)


def test_resolve_inside(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    assert resolve_inside(root, "m", "1") == root.resolve() / "m" / "1"
    with pytest.raises(InvalidArgument, match="outside"):
        resolve_inside(root, "..", "etc")
    with pytest.raises(InvalidArgument, match="outside"):
        resolve_inside(root, "/etc/passwd")


def test_traversal_names_refused_by_scan_model(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    make_model(root, "ok")
    make_model(tmp_path, "outside")
    for name in ("../outside", "..", "ok/../ok", "/etc"):
        with pytest.raises(InvalidArgument):
            scan_model(root, name)
    with pytest.raises(NotFound):
        scan_model(root, "missing")
    with pytest.raises(NotFound):
        scan_model(tmp_path / "no-such-repo", "ok")


def test_symlink_escaping_repository_refused(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    make_model(root, "ok")
    outside = make_model(tmp_path, "secret")
    os.symlink(outside, root / "linked")
    # A version directory linking out of the repository is refused too.
    escaping_version = make_model(root, "vlink", versions=())
    os.symlink(outside / "1", escaping_version / "1")
    # A symlink that stays inside the repository is fine.
    os.symlink(root / "ok", root / "alias")

    models, errors = scan_repository(root)
    assert set(models) == {"ok", "alias"}
    assert "outside" in errors["linked"]
    assert "outside" in errors["vlink"]
    with pytest.raises(InvalidArgument, match="outside"):
        scan_model(root, "linked")


def test_bad_model_does_not_break_scan(tmp_path: Path) -> None:
    make_model(tmp_path, "good", pbtxt='name: "good" platform: "onnxruntime_onnx"')
    make_model(tmp_path, "badcfg", pbtxt="this is not { a config")
    make_model(tmp_path, "noversions", versions=())
    make_model(tmp_path, "mismatch", pbtxt='name: "other"')
    make_model(tmp_path, "invalid", pbtxt='input [{ name: "x" dims: [1] }]')
    make_model(tmp_path, "nofile", model_file="weights.bin")
    (tmp_path / "README.md").write_text("not a model")
    (tmp_path / ".git").mkdir()

    models, errors = scan_repository(tmp_path)
    assert set(models) == {"good"}
    assert set(errors) == {"badcfg", "noversions", "mismatch", "invalid", "nofile"}
    assert "config.pbtxt" in errors["badcfg"]
    assert "version" in errors["noversions"]
    assert "TYPE_INVALID" in errors["invalid"]
    source = models["good"]
    assert source.name == "good"
    assert source.path == (tmp_path / "good").resolve()
    assert source.config.name == "good"
    assert list(source.versions) == [1]


def test_scan_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        scan_repository(tmp_path / "nope")


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_tracks_changes(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "m", versions=(1,), pbtxt="max_batch_size: 2")

    first = scan_model(tmp_path, "m").fingerprint
    assert scan_model(tmp_path, "m").fingerprint == first

    weights = model_dir / "1" / "model.onnx"
    weights.write_bytes(b"new weights, different size")
    second = scan_model(tmp_path, "m").fingerprint
    assert second != first

    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same size, new mtime
    third = scan_model(tmp_path, "m").fingerprint
    assert third != second

    (model_dir / "1" / "extra.txt").write_text("labels")
    fourth = scan_model(tmp_path, "m").fingerprint
    assert fourth != third

    (model_dir / "2").mkdir()
    (model_dir / "2" / "model.onnx").write_bytes(b"v2")
    fifth = scan_model(tmp_path, "m")
    assert list(fifth.versions) == [2]
    assert fifth.fingerprint != fourth

    (model_dir / "config.pbtxt").write_text("max_batch_size: 4")
    assert scan_model(tmp_path, "m").fingerprint != fifth.fingerprint


def test_fingerprint_ignores_unselected_versions(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "m", versions=(1, 2))
    before = scan_model(tmp_path, "m").fingerprint
    (model_dir / "1" / "model.onnx").write_bytes(b"changed old version, not served")
    assert scan_model(tmp_path, "m").fingerprint == before


def test_fingerprint_tracks_nested_savedmodel(tmp_path: Path) -> None:
    model_dir = make_model(tmp_path, "tf", model_file="model.savedmodel")
    before = scan_model(tmp_path, "tf")
    assert before.config.backend == "tensorflow"
    (model_dir / "1" / "model.savedmodel" / "variables").mkdir()
    (model_dir / "1" / "model.savedmodel" / "variables" / "v.index").write_bytes(b"i")
    assert scan_model(tmp_path, "tf").fingerprint != before.fingerprint


def test_settings_this_server_does_not_implement_fail_the_load_naming_each() -> None:
    from google.protobuf import text_format

    from dl_inference.repository.config import validate_config
    from dl_inference.repository.unsupported import unsupported_settings

    config = text_format.Parse(
        """
        name: "m" max_batch_size: 4
        input [{ name: "x" data_type: TYPE_FP32 dims: [4] allow_ragged_batch: true format: FORMAT_NCHW }]
        output [{ name: "y" data_type: TYPE_FP32 dims: [4] label_filename: "labels.txt" }]
        sequence_batching { max_sequence_idle_microseconds: 1000 }
        response_cache { enable: true }
        model_transaction_policy { decoupled: true }
        instance_group [{ name: "g" count: 1 kind: KIND_CPU rate_limiter { priority: 1 } }]
        optimization {
          execution_accelerators { cpu_execution_accelerator [{ name: "openvino" }] }
          input_pinned_memory { enable: true }
        }
        """,
        mc.ModelConfig(),
    )
    assert unsupported_settings(config) == [
        "sequence_batching (stateful models)",
        "response_cache { enable: true }",
        "model_transaction_policy { decoupled: true }",
        "instance_group 'g' rate_limiter",
        "input 'x' allow_ragged_batch",
        "optimization execution_accelerators",
    ]  # label_filename, format and pinned memory are accepted: they change nothing here
    with pytest.raises(InvalidArgument, match="model 'm': this server does not implement sequence_batching"):
        validate_config(config)
    plain = text_format.Parse(
        'name: "m" model_transaction_policy { decoupled: false } response_cache { enable: false }',
        mc.ModelConfig(),
    )
    assert unsupported_settings(plain) == []
    ensemble = text_format.Parse('name: "e" platform: "ensemble" ensemble_scheduling { step [] }', mc.ModelConfig())
    assert unsupported_settings(ensemble) == ["ensemble_scheduling (ensemble pipelines)"]
