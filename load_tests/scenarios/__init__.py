"""Load scenarios for ``python -m load_tests.perf``: a model, its inputs and data, and option defaults.

A scenario is a YAML file (``load_tests/scenarios/<name>.yaml``, or any path)::

    description: the tiny MLP example model
    model: simple                 # any perf option, by its long name with underscores:
    protocol: grpc                #   url, protocol, model_version, batch, concurrency, rate, arrival,
    concurrency: [1, 4, 16]       #   max_outstanding, window_ms, stability_pct, max_windows, warmup, ...
    inputs:                       # optional: by default every input comes from the model's metadata
      - name: x
        datatype: FP32            # optional when the server has metadata
        shape: [-1, 16]           # the request's full shape; -1 first = --batch, other -1 = 1
        data: random              # random | zeros | {source: file, path: x.npy} | {source: jpeg, size: [224, 224]}
    outputs: [y]                  # optional: request (and check) only these
    parameters: {top_k: 1}        # optional request parameters
    pool: 8                       # distinct requests to cycle through (different random data / images)
    repository:                   # what ``--make-repo DIR`` writes
      - {kind: example, name: simple}

Options given on the command line win over the scenario's. Repository kinds: ``example`` (a model of
``dl_inference.examples``), ``resnet_like`` (``load_tests.models.write_model_repo``) and
``tensor_op`` (a one-op ONNX model: ``reduce_sum`` or ``identity`` of one big tensor).
"""

from __future__ import annotations

import dataclasses
import glob
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = [
    "SCENARIO_DIR",
    "DataSource",
    "InputDecl",
    "Scenario",
    "ScenarioError",
    "available_scenarios",
    "find_scenario",
    "load_scenario",
    "make_array",
    "make_repository",
    "parse_data_source",
    "parse_scenario",
]

SCENARIO_DIR = Path(__file__).resolve().parent

#: Scenario keys that are not perf options.
SCENARIO_KEYS = frozenset({"description", "inputs", "outputs", "parameters", "pool", "repository"})
#: perf options a scenario may set (the CLI's long names with underscores).
OPTION_KEYS = frozenset(
    {
        "url",
        "protocol",
        "model",
        "model_version",
        "batch",
        "concurrency",
        "rate",
        "arrival",
        "max_outstanding",
        "window_ms",
        "stability_pct",
        "max_windows",
        "warmup",
        "request_timeout",
        "connect_timeout",
        "check_every",
        "serialize",
        "tfs_format",
        "tfs_signature",
        "late_ms",
        "seed",
        "stats_url",
        "stability_windows",
    }
)
DATA_KINDS = ("random", "zeros", "file", "jpeg")


class ScenarioError(ValueError):
    """A scenario file (or an input/data declaration) that cannot be used, with the reason."""


@dataclasses.dataclass
class DataSource:
    """Where an input's values come from."""

    kind: str = "random"  # random | zeros | file | jpeg
    path: str | None = None  # file: a file, a directory or a glob (relative to the scenario file)
    size: tuple[int, int] = (224, 224)  # jpeg: height, width
    quality: int = 90  # jpeg
    base_dir: Path | None = None  # where relative paths are resolved


@dataclasses.dataclass
class InputDecl:
    """An input as a scenario or ``--input`` declares it; None fields come from the model's metadata."""

    name: str
    datatype: str | None = None
    shape: list[int] | None = None
    data: DataSource = dataclasses.field(default_factory=DataSource)


@dataclasses.dataclass
class Scenario:
    name: str
    path: Path | None
    description: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    inputs: list[InputDecl] = dataclasses.field(default_factory=list)
    outputs: list[str] = dataclasses.field(default_factory=list)
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    pool: int | None = None
    repository: list[dict[str, Any]] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# parsing


def available_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def find_scenario(name_or_path: str) -> Path:
    """A scenario name (``tiny_mlp``) or a path to a YAML file -> the file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ScenarioError(f"scenario file {path} does not exist")
        return path
    candidate = SCENARIO_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ScenarioError(f"unknown scenario '{name_or_path}'; bundled: {', '.join(available_scenarios())}")
    return candidate


def load_scenario(name_or_path: str) -> Scenario:
    path = find_scenario(name_or_path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    return parse_scenario(doc, name=path.stem, path=path)


def _where(path: Path | None, what: str) -> str:
    return f"{path}: {what}" if path else what


def parse_data_source(value: Any, base_dir: Path | None = None, where: str = "data") -> DataSource:
    """``random`` | ``zeros`` | ``{source: file, path: P}`` | ``{source: jpeg, size: [H, W], quality: Q}``."""
    if value is None:
        return DataSource(base_dir=base_dir)
    if isinstance(value, str):
        if value not in ("random", "zeros"):
            raise ScenarioError(
                f"{where}: '{value}' is not a data source; use random, zeros or a mapping with 'source'"
            )
        return DataSource(kind=value, base_dir=base_dir)
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: expected a string or a mapping, got {type(value).__name__}")
    unknown = set(value) - {"source", "path", "size", "quality"}
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {sorted(unknown)} (allowed: source, path, size, quality)")
    kind = value.get("source", "random")
    if kind not in DATA_KINDS:
        raise ScenarioError(f"{where}: source '{kind}' unknown; use one of {', '.join(DATA_KINDS)}")
    source = DataSource(kind=kind, base_dir=base_dir)
    if kind == "file":
        if not value.get("path"):
            raise ScenarioError(f"{where}: source 'file' needs a 'path'")
        source.path = str(value["path"])
    if "size" in value:
        size = value["size"]
        if isinstance(size, int):
            size = [size, size]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
            raise ScenarioError(f"{where}: size must be [height, width] (positive integers), got {value['size']!r}")
        source.size = (size[0], size[1])
    if "quality" in value:
        q = value["quality"]
        if not (isinstance(q, int) and 1 <= q <= 100):
            raise ScenarioError(f"{where}: quality must be an integer 1..100, got {q!r}")
        source.quality = q
    return source


def _parse_shape(value: Any, where: str) -> list[int]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    try:
        shape = [int(d) for d in value]
    except (TypeError, ValueError):
        raise ScenarioError(f"{where}: shape must be a list of integers, got {value!r}") from None
    if any(d < -1 or d == 0 for d in shape):
        raise ScenarioError(f"{where}: shape dims must be positive or -1, got {shape}")
    return shape


def parse_inputs(value: Any, base_dir: Path | None = None, where: str = "inputs") -> list[InputDecl]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ScenarioError(f"{where}: expected a list of inputs")
    from dl_inference.protocol.datatypes import V2_DATATYPES

    decls: list[InputDecl] = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, dict) or "name" not in item:
            raise ScenarioError(f"{at}: each input is a mapping with at least 'name'")
        unknown = set(item) - {"name", "datatype", "shape", "data"}
        if unknown:
            raise ScenarioError(f"{at}: unknown keys {sorted(unknown)} (allowed: name, datatype, shape, data)")
        datatype = item.get("datatype")
        if datatype is not None and datatype not in V2_DATATYPES:
            raise ScenarioError(f"{at}: datatype '{datatype}' is not a V2 datatype ({', '.join(V2_DATATYPES)})")
        shape = _parse_shape(item["shape"], at) if item.get("shape") is not None else None
        data = parse_data_source(item.get("data"), base_dir, f"{at}.data")
        if data.kind == "jpeg" and datatype not in (None, "BYTES"):
            raise ScenarioError(f"{at}: jpeg data needs a BYTES input, not {datatype}")
        decls.append(InputDecl(str(item["name"]), datatype, shape, data))
    names = [d.name for d in decls]
    if len(set(names)) != len(names):
        raise ScenarioError(f"{where}: input names repeat: {names}")
    return decls


def parse_scenario(doc: Any, name: str = "scenario", path: Path | None = None) -> Scenario:
    if not isinstance(doc, dict):
        raise ScenarioError(_where(path, "a scenario is a YAML mapping"))
    unknown = set(doc) - SCENARIO_KEYS - OPTION_KEYS
    if unknown:
        raise ScenarioError(
            _where(
                path,
                f"unknown keys {sorted(unknown)}; scenario keys: {', '.join(sorted(SCENARIO_KEYS))}; "
                f"options: {', '.join(sorted(OPTION_KEYS))}",
            )
        )
    base_dir = path.parent if path else None
    try:
        inputs = parse_inputs(doc.get("inputs"), base_dir)
    except ScenarioError as exc:
        raise ScenarioError(_where(path, str(exc))) from None
    outputs = doc.get("outputs") or []
    if not (isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)):
        raise ScenarioError(_where(path, "outputs must be a list of output names"))
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict) or not all(isinstance(v, (bool, int, float, str)) for v in parameters.values()):
        raise ScenarioError(_where(path, "parameters must map names to bool/int/float/string values"))
    pool = doc.get("pool")
    if pool is not None and not (isinstance(pool, int) and pool >= 1):
        raise ScenarioError(_where(path, f"pool must be an integer >= 1, got {pool!r}"))
    repository = doc.get("repository") or []
    if not isinstance(repository, list) or not all(isinstance(r, dict) and "kind" in r for r in repository):
        raise ScenarioError(_where(path, "repository must be a list of mappings, each with a 'kind'"))
    for entry in repository:
        if entry["kind"] not in REPOSITORY_KINDS:
            raise ScenarioError(
                _where(path, f"repository kind '{entry['kind']}' unknown; use one of {', '.join(REPOSITORY_KINDS)}")
            )
    options = {k: v for k, v in doc.items() if k in OPTION_KEYS}
    return Scenario(
        name=name,
        path=path,
        description=str(doc.get("description", "")).strip(),
        options=options,
        inputs=inputs,
        outputs=list(outputs),
        parameters=dict(parameters),
        pool=pool,
        repository=list(repository),
    )


# ---------------------------------------------------------------------------------------------
# data


def _resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None and not p.exists():
        p = base_dir / p
    return p


def _data_files(source: DataSource) -> list[Path]:
    assert source.path is not None
    p = _resolve(source.path, source.base_dir)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
    elif any(ch in str(p) for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p)) if Path(f).is_file())
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise ScenarioError(f"data file(s) '{source.path}' not found (resolved to {p})")
    return files


def jpeg_bytes(rng: np.random.Generator, size: tuple[int, int], quality: int) -> bytes:
    """A synthetic JPEG: a random base colour with a gradient and noise, so it compresses like a photo."""
    from PIL import Image

    h, w = size
    base = rng.uniform(0, 255, size=3)
    gy = np.linspace(-40, 40, h, dtype=np.float32)[:, None, None]
    gx = np.linspace(-40, 40, w, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, 12, size=(h, w, 3))
    pixels = np.clip(base + gy + gx * rng.uniform(-1, 1) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _fit(array: np.ndarray, shape: list[int], what: str) -> np.ndarray:
    """Reshape file data to the request shape; data for one row is repeated over the batch."""
    n = math.prod(shape)
    if array.size == n:
        return array.reshape(shape)
    if shape and array.size * shape[0] == n:
        return np.broadcast_to(array.reshape([1, *shape[1:]]), shape).copy()
    raise ScenarioError(f"{what}: {array.size} values do not fit shape {shape} (or one row of it)")


def make_array(
    name: str, datatype: str, shape: list[int], source: DataSource, rng: np.random.Generator, index: int = 0
) -> np.ndarray:
    """The values of one input for pool entry ``index`` (BYTES: object array of ``bytes``)."""
    from dl_inference.protocol.datatypes import numpy_dtype
    from load_tests.loadgen import random_array

    what = f"input '{name}'"
    n = math.prod(shape)
    if source.kind == "random":
        return random_array(datatype, shape, rng)
    if source.kind == "zeros":
        if datatype == "BYTES":
            arr = np.empty(n, dtype=np.object_)
            arr[:] = [b""] * n
            return arr.reshape(shape)
        return np.zeros(shape, dtype=numpy_dtype(datatype))
    if source.kind == "jpeg":
        if datatype != "BYTES":
            raise ScenarioError(f"{what}: jpeg data needs a BYTES input, not {datatype}")
        arr = np.empty(n, dtype=np.object_)
        arr[:] = [jpeg_bytes(rng, source.size, source.quality) for _ in range(n)]
        return arr.reshape(shape)
    # file
    files = _data_files(source)
    if datatype == "BYTES":
        arr = np.empty(n, dtype=np.object_)
        arr[:] = [files[(index * n + k) % len(files)].read_bytes() for k in range(n)]
        return arr.reshape(shape)
    path = files[index % len(files)]
    if path.suffix == ".npy":
        data = np.load(path, allow_pickle=False)
        return _fit(np.asarray(data).astype(numpy_dtype(datatype), copy=False), shape, f"{what} ({path})")
    raw = np.frombuffer(path.read_bytes(), dtype=numpy_dtype(datatype))
    return _fit(raw, shape, f"{what} ({path}, raw {datatype})")


# ---------------------------------------------------------------------------------------------
# model repositories


def _example(root: Path, entry: dict[str, Any]) -> str:
    from dl_inference.examples import EXAMPLE_MODELS

    name = entry.get("name")
    if name not in EXAMPLE_MODELS:
        raise ScenarioError(f"repository: example '{name}' unknown; examples: {', '.join(EXAMPLE_MODELS)}")
    EXAMPLE_MODELS[name](root)
    return str(name)


def _resnet_like(root: Path, entry: dict[str, Any]) -> str:
    from load_tests.models import write_model_repo

    allowed = {"kind", "name", "batching", "max_batch_size", "delay_us", "instances", "preferred", "image", "width"}
    unknown = set(entry) - allowed
    if unknown:
        raise ScenarioError(f"repository resnet_like: unknown keys {sorted(unknown)}")
    name = str(entry.get("name", "resnet_cnn"))
    write_model_repo(
        root,
        name,
        batching=bool(entry.get("batching", True)),
        max_batch_size=int(entry.get("max_batch_size", 32)),
        delay_us=int(entry.get("delay_us", 2000)),
        instances=int(entry.get("instances", 1)),
        preferred=entry.get("preferred"),
        image=int(entry.get("image", 64)),
        width=int(entry.get("width", 32)),
    )
    return name


def tensor_op_model(op: str, datatype: str, dims: list[int], batched: bool) -> Any:
    """One-op ONNX model ``x -> y``: ``identity`` (y = x) or ``reduce_sum`` (sum over the last axis)."""
    from onnx import TensorProto, helper

    from dl_inference.examples import IR_VERSION, ONNX_ELEMENT_TYPE, OPSET

    elem = ONNX_ELEMENT_TYPE[datatype]
    in_shape: list[Any] = (["batch"] if batched else []) + list(dims)
    initializers = []
    if op == "identity":
        nodes = [helper.make_node("Identity", ["x"], ["y"], name="identity")]
        out_shape = in_shape
    elif op == "reduce_sum":
        axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
        initializers.append(axes)
        nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0, name="reduce_sum")]
        out_shape = in_shape[:-1]
    else:
        raise ScenarioError(f"repository tensor_op: op '{op}' unknown; use identity or reduce_sum")
    graph = helper.make_graph(
        nodes,
        f"tensor_{op}",
        [helper.make_tensor_value_info("x", elem, in_shape)],
        [helper.make_tensor_value_info("y", elem, out_shape)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="load_tests.perf")
    model.ir_version = IR_VERSION
    import onnx

    onnx.checker.check_model(model)
    return model


def _tensor_op(root: Path, entry: dict[str, Any]) -> str:
    from google.protobuf import text_format

    from dl_inference.protocol.datatypes import v2_to_config
    from dl_inference.protocol.generated import model_config_pb2 as mc

    allowed = {"kind", "name", "op", "datatype", "dims", "max_batch_size"}
    unknown = set(entry) - allowed
    if unknown:
        raise ScenarioError(f"repository tensor_op: unknown keys {sorted(unknown)}")
    name = str(entry.get("name", "tensor_op"))
    op = str(entry.get("op", "reduce_sum"))
    datatype = str(entry.get("datatype", "FP32"))
    dims = _parse_shape(entry.get("dims", [1024]), f"repository {name}.dims")
    if op == "reduce_sum" and len(dims) < 2:
        raise ScenarioError(f"repository {name}: reduce_sum needs at least 2 dims (it sums over the last)")
    max_batch = int(entry.get("max_batch_size", 0))
    model = tensor_op_model(op, datatype, dims, batched=max_batch > 0)
    model_dir = Path(root) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.onnx").write_bytes(model.SerializeToString())
    config = mc.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch)
    config.input.add(name="x", data_type=getattr(mc, v2_to_config(datatype)), dims=dims)
    config.output.add(
        name="y", data_type=getattr(mc, v2_to_config(datatype)), dims=dims if op == "identity" else dims[:-1]
    )
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")
    return name


REPOSITORY_KINDS = {"example": _example, "resnet_like": _resnet_like, "tensor_op": _tensor_op}


def make_repository(scenario: Scenario, root: Path) -> list[str]:
    """Write the models ``scenario.repository`` lists under ``root``; returns their names."""
    if not scenario.repository:
        raise ScenarioError(f"scenario '{scenario.name}' lists no repository models")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return [REPOSITORY_KINDS[entry["kind"]](root, entry) for entry in scenario.repository]
