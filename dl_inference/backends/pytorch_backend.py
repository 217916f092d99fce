"""PyTorch backend: torch.export programs, AOTInductor packages, TorchScript, model.py + weights.

Model file, chosen from the version directory (or ``default_model_filename``):

* ``model.py`` (+ ``model.safetensors`` or a ``model.pt`` state_dict): ``model.py`` defines
  ``create_model()`` returning the ``nn.Module`` (or a class ``Model`` taking no arguments); the
  weights are read without unpickling code (safetensors, or ``torch.load(weights_only=True)``).
* ``model.pt2``: a ``torch.export`` ExportedProgram (the default format), or an AOTInductor package
  built by ``torch._inductor.aoti_compile_and_package`` (told apart by the package's contents).
* ``model.pt``: TorchScript (legacy).
* ``model.pth``: a pickled whole module (dl_inference's old format). Unpickling runs whatever code
  the file names, so it is refused unless the config sets ``parameters { key: "allow_pickle" ... "true" }``.

A torch.export program whose config lists no inputs and no outputs gets them from its signature
(``forward``'s argument names; outputs ``output__0``, ...; dtypes and dims; batching when every first
dimension is dynamic). Otherwise the config must list inputs and outputs: other PyTorch files do not
name their tensors (the loader refuses a model left with none). The module is
called with the inputs positionally, in config order; a tensor result is the single output, a
tuple/list maps to the outputs in config order, a dict by name. (Without inputs/outputs in the
config — a model behind a ``handler.py`` — inputs are passed in the order the handler gives them and
outputs are named ``output__0``, ``output__1``, ... or by the dict's keys.) A handler's ``preprocess``
may give ``torch.Tensor`` s instead of numpy arrays: one already on the instance's device is used
in place (cast there to the precision), so GPU-side preprocessing costs no host round trip.

Config parameters: ``precision`` fp32|fp16|bf16 (module and float inputs cast; outputs cast back to
the config datatype; on a CPU without native support for it, e.g. bf16 without AVX-512 BF16 or AMX, the
worker logs that it is emulated); ``channels_last`` true|false (default false: 4-D weights and inputs
in NHWC order, oneDNN's fast layout for convolutions on CPU); ``compile``
off|default|reduce-overhead|max-autotune (``torch.compile`` mode; reduce-overhead uses CUDA graphs);
``compile_batch_sizes`` "1,8,32": batches are padded up to the next of these sizes (and larger ones
run in chunks of the largest), and each size is warmed up before the model is ready, so requests
never wait for a compile; ``intra_op_threads`` (CPU, default 1 per instance, as for ONNX Runtime).
``instance_group`` KIND_GPU places the instance on its GPU.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import sys
import threading
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dl_inference import cpu_features
from dl_inference.backends.base import Backend, get_parameter, parameter_bool, parameter_int
from dl_inference.backends.tensor_specs import ModelTensor, complete_io
from dl_inference.errors import Code, InternalError, InvalidArgument, ServerError
from dl_inference.protocol.datatypes import numpy_dtype
from dl_inference.protocol.generated.model_config_pb2 import ModelConfig
from dl_inference.protocol.model_info import dtype_name

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_TORCH_DTYPES = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FP16": torch.float16, "BF16": torch.bfloat16, "FP32": torch.float32,
    "FP64": torch.float64, "UINT16": torch.uint16, "UINT32": torch.uint32, "UINT64": torch.uint64,
}  # fmt: skip


def _module_from_py(path: Path, model_name: str) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location(f"dl_inference_model_{model_name}_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise InvalidArgument(f"model '{model_name}': cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # classes defined there must be importable by name (pickling, dataclasses)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[spec.name]
        raise InvalidArgument(
            f"model '{model_name}': {path.name} failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    factory = getattr(module, "create_model", None) or getattr(module, "Model", None)
    if factory is None:
        raise InvalidArgument(f"model '{model_name}': {path.name} must define create_model() or a class Model")
    try:
        net = factory()
    except Exception as exc:
        raise InvalidArgument(f"model '{model_name}': {path.name}: building the module failed: {exc}") from exc
    if not isinstance(net, torch.nn.Module):
        raise InvalidArgument(f"model '{model_name}': {path.name} built a {type(net).__name__}, not a torch.nn.Module")
    return net


def _load_state_dict(net: torch.nn.Module, version_dir: Path, model_name: str) -> str:
    """Load weights next to model.py, if any; return what was loaded."""
    st = version_dir / "model.safetensors"
    pt = version_dir / "model.pt"
    if st.exists():
        from safetensors.torch import load_file

        state = load_file(str(st))
        source = st.name
    elif pt.exists():
        try:
            state = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses anything but tensors and plain containers
            raise InvalidArgument(
                f"model '{model_name}': {pt.name} next to model.py must be a state_dict of tensors: {exc}"
            ) from exc
        if not isinstance(state, dict):
            raise InvalidArgument(f"model '{model_name}': {pt.name} is a {type(state).__name__}, not a state_dict")
        source = pt.name
    else:
        return "no weights file (the module's own initialisation)"
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidArgument(f"model '{model_name}': {source} does not fit the module in model.py: {exc}") from exc
    return source


def _allow_recompiles(graphs: int) -> None:
    """Let Dynamo keep ``graphs`` compiled graphs of one module (one per compile batch size, as
    dynamic=False compiles each shape). Its default keeps 8 and silently runs further shapes eagerly."""
    import torch._dynamo.config as dynamo_config

    for attr in ("recompile_limit", "cache_size_limit"):  # the name before torch 2.7
        if hasattr(dynamo_config, attr):
            setattr(dynamo_config, attr, max(getattr(dynamo_config, attr), graphs))
            return


def _is_aoti_package(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any("aotinductor" in n for n in z.namelist())
    except zipfile.BadZipFile:
        return False


class PyTorchBackend(Backend):
    name = "pytorch"

    def __init__(self) -> None:
        self.module: Any = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.channels_last = False
        self.program_signature: tuple[dict[str, ModelTensor], dict[str, ModelTensor]] | None = None
        self.inputs: list[tuple[str, torch.dtype]] = []
        self.outputs: list[tuple[str, np.dtype]] = []
        self.buckets: list[int] = []
        self.max_batch_size = 0
        self.model_name = ""
        self.format = ""
        # On a GPU every torch call runs on this one thread: CUDA graphs captured while warming up
        # belong to the capturing thread, and the thread's current device is the instance's GPU.
        self._gpu_thread: ThreadPoolExecutor | None = None
        self._gpu_thread_id: int | None = None
        self._staging: dict[str, torch.Tensor] = {}  # page-locked host buffers, one per input, reused

    # -- loading --------------------------------------------------------------------------------
    def load(
        self, version_dir: Path, config: ModelConfig, device: str = "cpu", device_id: int | None = None
    ) -> ModelConfig:
        start = time.monotonic()
        name = self.model_name = config.name
        completed = ModelConfig()
        completed.CopyFrom(config)
        completed.backend = "pytorch"
        if device == "gpu":
            if not torch.cuda.is_available():
                raise ServerError(
                    f"model '{name}': instance_group asks for a GPU but this worker's torch {torch.__version__} "
                    f"sees no CUDA device",
                    Code.FAILED_PRECONDITION,
                )
            self.device = torch.device("cuda", device_id or 0)
            self._gpu_thread = ThreadPoolExecutor(1, thread_name_prefix=f"torch-{name}")
            self._gpu_thread_id = self._gpu_thread.submit(self._bind_gpu_thread).result()
        else:
            torch.set_num_threads(parameter_int(config, "intra_op_threads", 1, minimum=1))
        precision = (get_parameter(config, "precision") or "fp32").lower()
        if precision not in PRECISIONS:
            raise InvalidArgument(
                f"model '{name}': parameter 'precision' must be fp32, fp16 or bf16, got '{precision}'"
            )
        self.dtype = PRECISIONS[precision]
        if self.device.type == "cpu" and precision != "fp32":
            native = cpu_features.native_precisions()
            if precision not in native:
                log.warning(
                    "model '%s': precision %s on this CPU (%s) is emulated, not native (native: %s; %s needs %s): "
                    "expect it slower than fp32",
                    name, precision, cpu_features.cpu_info()[0], ", ".join(sorted(native)) or "fp32 only", precision,
                    cpu_features.NATIVE_FLAGS[precision],
                )  # fmt: skip
        self.channels_last = parameter_bool(config, "channels_last", False)
        mode = (get_parameter(config, "compile") or "off").lower()
        if mode not in COMPILE_MODES:
            raise InvalidArgument(
                f"model '{name}': parameter 'compile' must be one of {', '.join(COMPILE_MODES)}, got '{mode}'"
            )
        self.max_batch_size = config.max_batch_size
        self.buckets = self._buckets(config)
        for t in config.input:
            if dtype_name(t.data_type) not in _TORCH_DTYPES:
                raise InvalidArgument(
                    f"model '{name}': input '{t.name}' is {dtype_name(t.data_type)}; PyTorch models take numeric "
                    f"tensors (turn BYTES into tensors in a handler.py)"
                )

        module = self._read(version_dir, config)
        if self.program_signature is not None and not config.input and not config.output:
            # A torch.export program names and types its tensors: the config is completed from them
            # (the batch dimension is the first one when it is dynamic in every tensor).
            complete_io(completed, *self.program_signature, what="torch.export program")
            self.max_batch_size = completed.max_batch_size
        self.inputs = [(t.name, _TORCH_DTYPES[dtype_name(t.data_type)]) for t in completed.input]
        self.outputs = [(t.name, numpy_dtype(dtype_name(t.data_type))) for t in completed.output]
        if self.format != "aoti":
            if self.format != "torch.export program":  # exported programs keep the mode they were exported in
                module = module.eval()
            module = module.to(self.device)
            if self.dtype != torch.float32:
                module = module.to(self.dtype)
            if self.channels_last:  # 4-D weights and inputs in NHWC order: oneDNN's fast path on CPU
                module = module.to(memory_format=torch.channels_last)
            if mode != "off":
                _allow_recompiles(len(self.buckets) + 1)
                module = torch.compile(module, mode=None if mode == "default" else mode, dynamic=False)
        elif precision != "fp32" or mode != "off":
            raise InvalidArgument(
                f"model '{name}': an AOTInductor package is compiled for its device and precision; "
                f"drop the 'precision'/'compile' parameters (they apply to model.pt2 programs, model.pt and model.py)"
            )
        self.module = module
        if mode != "off" and config.input:
            self._warm_up(config, mode)
        log.info(
            "model '%s': %s on %s, precision %s, compile %s%s, in %.1f s",
            name, self.format, self.device, precision, mode,
            f" (batch sizes {', '.join(map(str, self.buckets))})" if self.buckets else "", time.monotonic() - start,
        )  # fmt: skip
        return completed

    def _buckets(self, config: ModelConfig) -> list[int]:
        raw = get_parameter(config, "compile_batch_sizes")
        if not raw:
            return []
        try:
            sizes = sorted({int(v) for v in raw.replace(" ", "").split(",") if v})
        except ValueError:
            raise InvalidArgument(
                f"model '{config.name}': parameter 'compile_batch_sizes' must be a comma list of integers, got '{raw}'"
            ) from None
        if not sizes or sizes[0] < 1 or (config.max_batch_size and sizes[-1] > config.max_batch_size):
            raise InvalidArgument(
                f"model '{config.name}': compile_batch_sizes {raw} must be between 1 and max_batch_size "
                f"{config.max_batch_size}"
            )
        if config.max_batch_size == 0:
            raise InvalidArgument(f"model '{config.name}': compile_batch_sizes needs max_batch_size > 0")
        return sizes

    def _read(self, version_dir: Path, config: ModelConfig) -> Any:
        name = config.name
        chosen = config.default_model_filename
        candidates = [chosen] if chosen else ["model.py", "model.pt2", "model.pt", "model.pth"]
        path = next((version_dir / c for c in candidates if (version_dir / c).exists()), None)
        if path is None:
            raise InvalidArgument(
                f"model '{name}': no PyTorch model in {version_dir} (looked for {', '.join(candidates)})"
            )
        if path.suffix == ".py":
            net = _module_from_py(path, name)
            weights = _load_state_dict(net, version_dir, name)
            self.format = f"model.py + {weights}"
            return net
        if path.suffix == ".pt2":
            if _is_aoti_package(path):
                self.format = "aoti"
                if self.device.type == "cpu":
                    return torch._inductor.aoti_load_package(str(path))
                with torch.cuda.device(self.device):
                    return torch._inductor.aoti_load_package(str(path))
            try:
                program = torch.export.load(str(path))
            except Exception as exc:
                raise InvalidArgument(f"model '{name}': {path.name} is not a torch.export program: {exc}") from exc
            self.format = "torch.export program"
            self.program_signature = _export_signature(program, name)
            return program.module()
        if path.suffix == ".pth" or (path.suffix == ".pt" and not zipfile.is_zipfile(path)):
            if not parameter_bool(config, "allow_pickle"):
                raise InvalidArgument(
                    f"model '{name}': {path.name} is a pickled module. Loading it runs any code the file names "
                    f"(arbitrary code execution), so it is refused. Export the model with torch.export "
                    f"(model.pt2), or ship model.py + a state_dict; to load this file anyway set the config "
                    f"parameter allow_pickle to true"
                )
            log.warning("model '%s': unpickling %s because allow_pickle is set", name, path)
            net = torch.load(str(path), map_location="cpu", weights_only=False)
            if not isinstance(net, torch.nn.Module):
                raise InvalidArgument(f"model '{name}': {path.name} holds a {type(net).__name__}, not a module")
            self.format = "pickled module (allow_pickle)"
            return net
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            if parameter_bool(config, "allow_pickle"):
                self.format = "pickled module (allow_pickle)"
                return torch.load(str(path), map_location="cpu", weights_only=False)
            raise InvalidArgument(
                f"model '{name}': {path.name} is not TorchScript ({exc}). If it is a pickled module, loading it "
                f"runs arbitrary code: export it with torch.export (model.pt2) instead, or set allow_pickle"
            ) from exc
        self.format = "TorchScript"
        return net

    def _bind_gpu_thread(self) -> int:
        torch.cuda.set_device(self.device)
        return threading.get_ident()

    def _warm_up(self, config: ModelConfig, mode: str) -> None:
        """Compile and (for CUDA graphs) capture every batch size before the model is ready."""
        sizes = self.buckets or ([1] if config.max_batch_size else [0])
        repeats = 3 if "reduce-overhead" in mode or mode == "max-autotune" else 1
        for size in sizes:
            t0 = time.monotonic()
            inputs = {}
            for t in config.input:
                dims = [max(d, 1) for d in t.dims]
                shape = [size, *dims] if size else dims
                inputs[t.name] = np.zeros(shape, numpy_dtype(dtype_name(t.data_type)))
            for _ in range(repeats):
                self.infer(inputs, [])
            log.info("model '%s': compiled for batch size %d in %.1f s", self.model_name, size, time.monotonic() - t0)

    # -- inference ------------------------------------------------------------------------------
    @property
    def accepts_device_arrays(self) -> bool:
        """Inputs may be device memory (CUDA shared memory read in place) or several requests' rows
        unjoined (:class:`~dl_inference.sharedmem.cuda.DeviceParts`) when the model is on a GPU."""
        return self.device is not None and self.device.type == "cuda"

    def pin_host_memory(self, address: int, nbytes: int) -> bool:
        """Page-lock a host range (a shared-memory region's mapping) so inputs in it go to the GPU by DMA,
        with no copy through a staging buffer. False when CUDA refuses (the inputs are then staged)."""
        if not self.accepts_device_arrays:
            return False
        err = torch.cuda.cudart().cudaHostRegister(address, nbytes, 0)
        if int(err) != 0:
            log.warning(
                "model '%s': cannot page-lock a %d-byte shared-memory region (%s)", self.model_name, nbytes, err
            )
            return False
        return True

    def unpin_host_memory(self, address: int) -> None:
        torch.cuda.cudart().cudaHostUnregister(address)

    def _cast(self, t: torch.Tensor, want: torch.dtype | None) -> torch.dtype:
        dtype = want if want is not None else t.dtype
        if dtype.is_floating_point and self.format != "aoti":
            dtype = self.dtype
        return dtype

    def _staged(self, name: str, nbytes_like: torch.Tensor) -> torch.Tensor:
        """This input's page-locked buffer, at least as large as ``nbytes_like`` (flat, same dtype)."""
        staging = self._staging.get(name)
        if staging is None or staging.dtype != nbytes_like.dtype or staging.numel() < nbytes_like.numel():
            staging = torch.empty(nbytes_like.numel(), dtype=nbytes_like.dtype, pin_memory=True)
            self._staging[name] = staging
        return staging

    def _join(self, name: str, parts: list[Any], want: torch.dtype | None) -> torch.Tensor:
        """Several requests' rows straight into one device tensor: device rows copied on the GPU, rows in
        page-locked memory (shared-memory regions) by DMA, the others once through the staging buffer."""
        host = [torch.from_numpy(np.ascontiguousarray(p)) if isinstance(p, np.ndarray) else None for p in parts]
        first = host[0]
        if first is None:
            first = _device_tensor(parts[0])
        rows = sum(int(p.shape[0]) for p in parts)
        out = torch.empty((rows, *first.shape[1:]), dtype=first.dtype, device=self.device)
        staged = [t for t in host if t is not None and not t.is_pinned()]
        buffer = self._staged(name, out[: sum(int(t.shape[0]) for t in staged)]) if staged else None
        at: dict[int, int] = {}  # id(host tensor) -> its offset in the page-locked buffer
        used = 0
        for t in staged:  # one host copy each into the page-locked buffer
            assert buffer is not None
            buffer[used : used + t.numel()].view(t.shape).copy_(t)
            at[id(t)] = used
            used += t.numel()
        offset = 0
        for part, ht in zip(parts, host, strict=True):
            n = int(part.shape[0])
            target = out[offset : offset + n]
            if ht is None:  # device memory (a CUDA shared-memory region)
                target.copy_(_device_tensor(part))
            elif id(ht) not in at:  # page-locked already
                target.copy_(ht, non_blocking=True)
            else:
                assert buffer is not None
                target.copy_(buffer[at[id(ht)] : at[id(ht)] + ht.numel()].view(ht.shape), non_blocking=True)
            offset += n
        return out.to(self._cast(out, want))

    def _to_tensor(self, name: str, arr: Any, want: torch.dtype | None) -> torch.Tensor:
        if hasattr(arr, "parts"):  # sharedmem.cuda.DeviceParts: rows of several requests, joined on the GPU
            return self._join(name, arr.parts, want)
        if not isinstance(arr, torch.Tensor) and hasattr(arr, "__cuda_array_interface__"):
            arr = _device_tensor(arr)  # a CUDA shared-memory region, in place
        if isinstance(arr, torch.Tensor):
            # From a handler's preprocess (e.g. images decoded on the GPU) or a CUDA region: moved only if it
            # is elsewhere, cast where it lies.
            return arr.to(self.device, non_blocking=True).to(self._cast(arr, want))
        t = torch.from_numpy(np.ascontiguousarray(arr)) if arr.dtype != object else None
        if t is None:
            raise InvalidArgument(f"model '{self.model_name}': PyTorch models cannot take BYTES tensors")
        dtype = self._cast(t, want)
        if self.device.type != "cuda":
            return t.to(dtype)
        if t.is_pinned():  # in a page-locked shared-memory region: DMA from where the client put it
            return t.to(self.device, non_blocking=True).to(dtype)
        # A plain copy into a page-locked buffer, an asynchronous copy to the GPU, the cast there:
        # measured on an H200 (load_tests/bench_pytorch_gpu.py), casting on the host first halves
        # the bytes sent but costs more than it saves. The output's copy back orders the transfer
        # before the buffer's next use.
        host = self._staged(name, t)[: t.numel()].view(t.shape)
        host.copy_(t)
        return host.to(self.device, non_blocking=True).to(dtype)

    def _run(self, tensors: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        if self.channels_last:
            tensors = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in tensors]
        out = self.module(*tensors)
        if isinstance(out, torch.Tensor):
            items: list[tuple[str, Any]] = [(self.outputs[0][0] if self.outputs else "output__0", out)]
        elif isinstance(out, dict):
            items = list(out.items())
        elif isinstance(out, list | tuple):
            names = [n for n, _ in self.outputs] or [f"output__{i}" for i in range(len(out))]
            if len(out) != len(names):
                raise InternalError(
                    f"model '{self.model_name}' returned {len(out)} outputs, its config lists {len(names)}"
                )
            items = list(zip(names, out))
        else:
            raise InternalError(f"model '{self.model_name}' returned a {type(out).__name__}, not tensors")
        for key, value in items:
            if not isinstance(value, torch.Tensor):
                raise InternalError(f"model '{self.model_name}': output '{key}' is a {type(value).__name__}")
        return items

    def infer(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        if self.module is None:
            raise InternalError(f"model '{self.model_name}' is not loaded")
        if self._gpu_thread is not None and threading.get_ident() != self._gpu_thread_id:
            return self._gpu_thread.submit(self._infer, inputs, output_names).result()
        return self._infer(inputs, output_names)

    def _infer(self, inputs: dict[str, np.ndarray], output_names: Sequence[str]) -> dict[str, np.ndarray]:
        order: list[tuple[str, torch.dtype | None]] = list(self.inputs) or [(n, None) for n in inputs]
        for name, _ in order:
            if name not in inputs:
                raise InvalidArgument(f"model '{self.model_name}': input '{name}' is missing")
        rows = next(iter(inputs.values())).shape[0] if self.max_batch_size and inputs else 0
        chunks = [(0, rows)]
        if self.buckets and rows > self.buckets[-1]:
            step = self.buckets[-1]
            chunks = [(i, min(i + step, rows)) for i in range(0, rows, step)]
        parts: list[list[tuple[str, torch.Tensor]]] = []
        with torch.inference_mode():
            whole = [self._to_tensor(name, inputs[name], want) for name, want in order]
            for lo, hi in chunks:
                tensors = [t[lo:hi] for t in whole] if len(chunks) > 1 else whole
                n = hi - lo
                pad = self._pad_to(n) - n if self.buckets else 0
                if pad:
                    tensors = [torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) for t in tensors]
                items = self._run(tensors)
                if pad:
                    items = [(k, v[:n]) for k, v in items]
                if len(chunks) > 1:  # CUDA graphs reuse their output buffers on the next run
                    items = [(k, v.clone()) for k, v in items]
                parts.append(items)
        wanted = set(output_names)
        out: dict[str, np.ndarray] = {}
        types = dict(self.outputs)
        for i, (key, _) in enumerate(parts[0]):
            if wanted and key not in wanted:
                continue
            t = parts[0][i][1] if len(parts) == 1 else torch.cat([p[i][1] for p in parts])
            host = t.detach().cpu()
            if host.dtype == torch.bfloat16:  # numpy has no bfloat16; ml_dtypes' comes from the cast below
                host = host.float()
            result = host.numpy()
            if key in types and result.dtype != types[key]:
                result = result.astype(types[key])
            out[key] = result
        return out

    def _pad_to(self, n: int) -> int:
        for size in self.buckets:
            if size >= n:
                return size
        return n

    def unload(self) -> None:
        if self.module is None:
            return
        self.module = None
        self._staging.clear()
        if self._gpu_thread is not None:  # its thread-local CUDA graph pools go with the thread
            self._gpu_thread.shutdown(wait=True)
            self._gpu_thread = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        # model.py modules imported for this model can go too
        for key in [k for k in sys.modules if k.startswith(f"dl_inference_model_{self.model_name}_")]:
            del sys.modules[key]


def _device_tensor(value: Any) -> torch.Tensor:
    """A tensor on the GPU as it is, or a view of a sharedmem.cuda.DeviceArray (no copy)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.as_tensor(value, device=torch.device("cuda", value.device_id))


def _export_signature(program: Any, name: str) -> tuple[dict[str, ModelTensor], dict[str, ModelTensor]]:
    """The user inputs (named as the exported ``forward``'s arguments) and outputs (``output__0``, ...,
    as Triton names PyTorch outputs) of a torch.export program, with their dtypes and shapes (-1 where a
    dimension is dynamic)."""
    from torch.export.graph_signature import InputKind, OutputKind

    by_dtype = {dtype: v2 for v2, dtype in _TORCH_DTYPES.items()}

    def tensor(tensor_name: str, value: Any, kind: str) -> ModelTensor:
        if not isinstance(value, torch.Tensor) or value.dtype not in by_dtype:
            raise InvalidArgument(
                f"model '{name}': the torch.export program's {kind} '{tensor_name}' is not a numeric tensor "
                f"({type(value).__name__}); list the model's inputs and outputs in its config"
            )
        shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
        return ModelTensor(tensor_name, by_dtype[value.dtype], shape)

    nodes = {n.name: n for n in program.graph.nodes}
    inputs = {
        spec.arg.name: tensor(spec.arg.name, nodes[spec.arg.name].meta.get("val"), "input")
        for spec in program.graph_signature.input_specs
        if spec.kind == InputKind.USER_INPUT
    }
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = list(output_node.args[0])
    outputs: dict[str, ModelTensor] = {}
    for spec, node in zip(program.graph_signature.output_specs, values, strict=False):
        if spec.kind == OutputKind.USER_OUTPUT:
            out_name = f"output__{len(outputs)}"
            outputs[out_name] = tensor(out_name, getattr(node, "meta", {}).get("val"), "output")
    return inputs, outputs
