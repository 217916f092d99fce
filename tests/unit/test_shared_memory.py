"""The shared-memory registry (gateway), region mappings (worker) and their parameters, on real files.

A temporary directory stands in for /dev/shm (the code takes its directory as a parameter); the
end-to-end tests with tritonclient and real /dev/shm objects are tests/integration/test_shared_memory.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dl_inference.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.tensors import decode_inputs, set_parameter
from dl_inference.protocol.wire import peek_request
from dl_inference.sharedmem.mapping import RegionMaps
from dl_inference.sharedmem.params import (
    CUDA,
    LOCATIONS,
    SYSTEM,
    TensorRef,
    decode_locations,
    tensor_ref,
    uses_shared_memory,
)
from dl_inference.sharedmem.registry import SharedMemoryRegistry, _held_files, check_key


def _file(directory: Path, key: str, data: bytes) -> Path:
    path = directory / key
    path.write_bytes(data)
    return path


def _request(region: str = "r", offset: int = 0, byte_size: int = 8, output: str | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    x = request.inputs.add(name="x", datatype="FP32", shape=[2])
    set_parameter(x.parameters, "shared_memory_region", region)
    set_parameter(x.parameters, "shared_memory_byte_size", byte_size)
    if offset:
        set_parameter(x.parameters, "shared_memory_offset", offset)
    if output:
        y = request.outputs.add(name="y")
        set_parameter(y.parameters, "shared_memory_region", output)
        set_parameter(y.parameters, "shared_memory_byte_size", 8)
    return request


@pytest.fixture
def registry(tmp_path: Path) -> SharedMemoryRegistry:
    return SharedMemoryRegistry(shm_dir=tmp_path)


def test_keys_are_bare_dev_shm_names() -> None:
    assert check_key("/input_simple") == "input_simple"
    assert check_key("a.b-c_1") == "a.b-c_1"
    for bad in ("", "/", "..", "/..", "../x", "/a/b", ".hidden", "a b", "a\0b", "x" * 300):
        with pytest.raises(InvalidArgument, match="is not a /dev/shm name"):
            check_key(bad)


def test_register_checks_the_object(registry: SharedMemoryRegistry, tmp_path: Path) -> None:
    _file(tmp_path, "k", bytes(64))
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "k")
    with pytest.raises(InvalidArgument, match="no shared-memory object"):
        registry.register_system("a", "/missing", 0, 8)
    with pytest.raises(InvalidArgument, match="exceeds the 64 bytes"):
        registry.register_system("a", "/k", 60, 8)
    with pytest.raises(InvalidArgument, match="cannot open"):  # links are not followed out of the directory
        registry.register_system("a", "/link", 0, 8)
    with pytest.raises(InvalidArgument, match="not a shared-memory object"):
        registry.register_system("a", "/dir", 0, 8)
    with pytest.raises(InvalidArgument, match="byte_size must be positive"):
        registry.register_system("a", "/k", 0, 0)
    registry.register_system("a", "/k", 8, 56)
    with pytest.raises(AlreadyExists):
        registry.register_system("a", "/k", 0, 8)
    with pytest.raises(AlreadyExists):  # one namespace over both kinds
        registry.register_cuda("a", bytes(64), 0, 8)
    with pytest.raises(InvalidArgument, match="64-byte cudaIpcMemHandle_t"):
        registry.register_cuda("c", bytes(10), 0, 8)
    (region,) = registry.status(SYSTEM, "a")
    assert (region.key, region.location.offset, region.location.byte_size) == ("/k", 8, 56)
    with pytest.raises(NotFound):
        registry.status(CUDA, "a")


def test_attach_checks_every_use_and_pins(registry: SharedMemoryRegistry, tmp_path: Path) -> None:
    _file(tmp_path, "k", bytes(64))
    registry.register_system("r", "k", 16, 32)
    forgotten: list[list[int]] = []
    registry.on_forget = forgotten.append
    with pytest.raises(InvalidArgument, match="input 'x': shared-memory region 'nope' is not registered"):
        registry.attach(_request("nope"))
    with pytest.raises(InvalidArgument, match="offset 28 \\+ shared_memory_byte_size 8 exceeds the 32 bytes"):
        registry.attach(_request("r", offset=28))
    with pytest.raises(InvalidArgument, match=r"output 'y'.*not registered"):
        registry.attach(_request("r", output="other"))
    request = _request("r", offset=24)
    extra, pinned = registry.attach(request)
    assert pinned == ["r"] and registry.in_use["r"] == 1
    # the appended bytes merge into the client's request as the reserved parameter
    merged = pb.ModelInferRequest.FromString(request.SerializeToString() + extra)
    (loc,) = decode_locations(merged).values()
    assert (loc.key, loc.offset, loc.byte_size) == ("k", 16, 32)
    with pytest.raises(InvalidArgument, match="reserved for the server"):
        registry.attach(merged)
    with pytest.raises(FailedPrecondition, match="1 request\\(s\\) in flight"):
        registry.unregister(SYSTEM, "r")
    with pytest.raises(FailedPrecondition):
        registry.unregister(SYSTEM, "")
    assert forgotten == []
    registry.release(pinned)
    registry.unregister(SYSTEM, "r")
    assert forgotten == [[loc.generation]] and registry.status(SYSTEM, "") == []


def test_sweep_forgets_regions_of_clients_that_are_gone(registry: SharedMemoryRegistry, tmp_path: Path) -> None:
    for key in ("held", "unheld", "removed", "replaced", "busy"):  # all seen held by their clients at first
        _file(tmp_path, key, bytes(8))
        registry.register_system(key, key, 0, 8)
    (tmp_path / "removed").unlink()
    (tmp_path / "replaced").unlink()
    _file(tmp_path, "replaced", bytes(8))  # same name, another object
    _file(tmp_path, "invisible", bytes(8))
    registry.register_system("invisible", "invisible", 0, 8)  # its client is never seen (another PID namespace)
    _, pinned = registry.attach(_request("busy"))

    def ident(key: str) -> tuple[int, int]:
        st = os.stat(tmp_path / key)
        return st.st_dev, st.st_ino

    everyone = {ident(k) for k in ("held", "unheld", "busy")}
    assert sorted(registry.sweep(everyone)) == ["removed", "replaced"]
    held = {ident("held")}  # the client of "unheld" and "busy" went away
    assert registry.sweep(held) == []  # first strike
    assert registry.sweep(None) == []  # holders unknown: nothing is forgotten for being unheld
    assert registry.sweep(held) == []  # a strike only counts on two sweeps in a row...
    assert registry.sweep(held) == ["unheld"]  # ...and "busy" is in use
    assert sorted(r.name for r in registry.status(SYSTEM, "")) == ["busy", "held", "invisible"]
    registry.release(pinned)
    registry.sweep(held)
    assert registry.sweep(held) == ["busy"]


def test_holders_sees_a_mapping_of_another_process(registry: SharedMemoryRegistry, tmp_path: Path) -> None:
    _file(tmp_path, "k", bytes(4096))
    registry.register_system("r", "k", 0, 4096)
    st = os.stat(tmp_path / "k")
    maps = RegionMaps(tmp_path)
    maps.read_input("r", registry.status(SYSTEM, "r")[0].location, TensorRef("r", 0, 8), "input 'x'")
    held = registry.holders()
    assert held is not None and (st.st_dev, st.st_ino) not in held  # our own process does not count
    registry.own_pids = lambda: ()
    other = _held_files(set(), {os.geteuid()})  # counting this process as a client: it maps the file
    assert other is not None and (st.st_dev, st.st_ino) in other
    maps.close()


def test_region_maps_read_in_place_and_write(registry: SharedMemoryRegistry, tmp_path: Path) -> None:
    path = _file(tmp_path, "k", np.arange(8, dtype=np.float32).tobytes())
    registry.register_system("r", "k", 8, 24)
    loc = registry.status(SYSTEM, "r")[0].location
    maps = RegionMaps(tmp_path)
    view = maps.read_input("r", loc, TensorRef("r", 4, 8), "input 'x'")
    assert np.frombuffer(view, np.float32).tolist() == [3.0, 4.0]
    written = maps.write_output("r", loc, TensorRef("r", 8, 16), np.array([7, 9], np.float32), "FP32", "output 'y'")
    assert written == 8 and np.fromfile(path, np.float32).tolist()[4:6] == [7.0, 9.0]
    written = maps.write_output("r", loc, TensorRef("r", 0, 16), np.array([b"ab"], object), "BYTES", "output 's'")
    assert written == 6 and path.read_bytes()[8:14] == b"\x02\x00\x00\x00ab"
    with pytest.raises(InvalidArgument, match="output 'y': shared_memory_byte_size 4 of region 'r' is too small"):
        maps.write_output("r", loc, TensorRef("r", 0, 4), np.zeros(2, np.float32), "FP32", "output 'y'")
    with pytest.raises(InvalidArgument, match="exceeds the 24 bytes of region 'r'"):
        maps.read_input("r", loc, TensorRef("r", 20, 8), "input 'x'")
    del view
    os.truncate(path, 16)  # a client shrinking its object: refused, not a SIGBUS
    with pytest.raises(InvalidArgument, match="is now 16 bytes, shorter than the 32 registered"):
        maps.read_input("r", loc, TensorRef("r", 0, 8), "input 'x'")
    assert len(maps) == 1
    maps.forget([loc.generation])
    assert len(maps) == 0
    os.replace(_file(tmp_path, "k.new", bytes(64)), path)  # replaced after registration (a new inode)
    with pytest.raises(InvalidArgument, match="was replaced after it was registered"):
        maps.read_input("r", loc, TensorRef("r", 0, 8), "input 'x'")


def test_tensor_parameters_follow_tritons_rules() -> None:
    def ref(**params: object) -> TensorRef | None:
        t = pb.ModelInferRequest.InferInputTensor(name="x")
        for k, v in params.items():
            set_parameter(t.parameters, k, v)  # type: ignore[arg-type]
        return tensor_ref(t.parameters, "input 'x'")

    assert ref() is None
    assert ref(shared_memory_region="r", shared_memory_byte_size=8) == TensorRef("r", 0, 8)
    assert ref(shared_memory_region="r", shared_memory_byte_size=8, shared_memory_offset=4) == TensorRef("r", 4, 8)
    for params, fragment in (
        ({"shared_memory_offset": 1}, "'shared_memory_offset' given without 'shared_memory_region'"),
        ({"shared_memory_byte_size": 1}, "'shared_memory_byte_size' given without"),
        ({"shared_memory_region": "r"}, "'shared_memory_byte_size' must be given with"),
        ({"shared_memory_region": 3, "shared_memory_byte_size": 1}, "must be a non-empty string"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": "8"}, "must be an integer"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": -1}, "must not be negative"),
    ):
        with pytest.raises(InvalidArgument, match=fragment):
            ref(**params)


def test_peek_flags_possible_shared_memory_requests() -> None:
    plain = pb.ModelInferRequest(model_name="m", model_version="2")
    plain.inputs.add(name="x", datatype="FP32", shape=[1])
    plain.raw_input_contents.append(b"shared_memory_region")  # in tensor data: not a marker
    assert peek_request(plain.SerializeToString()) == ("m", "2", False)
    assert peek_request(_request().SerializeToString())[2]
    only_output = pb.ModelInferRequest(model_name="m")
    set_parameter(only_output.outputs.add(name="y").parameters, "shared_memory_region", "r")
    assert peek_request(only_output.SerializeToString())[2] and uses_shared_memory(only_output)
    reserved = pb.ModelInferRequest(model_name="m")
    set_parameter(reserved.parameters, LOCATIONS, "{}")
    assert peek_request(reserved.SerializeToString())[2] and uses_shared_memory(reserved)


def test_decode_inputs_takes_region_bytes_for_region_inputs() -> None:
    request = _request()
    y = request.inputs.add(name="y", datatype="INT8", shape=[1])
    request.raw_input_contents.append(b"\x05")
    data = np.array([1.5, 2.5], np.float32).tobytes()
    out = decode_inputs(request, lambda tensor, label: data if tensor.name == "x" else None)
    assert out["x"].tolist() == [1.5, 2.5] and out["y"].tolist() == [5]
    with pytest.raises(InvalidArgument, match="input 'x': shared-memory tensors are not served by this endpoint"):
        decode_inputs(request)
    request.raw_input_contents.append(b"\x06")
    with pytest.raises(InvalidArgument, match="expected 1 raw_input_contents entries \\(one per input not in shared"):
        decode_inputs(request, lambda tensor, label: data)
    assert y.name == "y"


def test_device_arrays_are_typed_checked_and_batched_without_a_host_copy() -> None:
    """The path of CUDA-region inputs to a GPU backend, with a host buffer standing in for the device."""
    from dl_inference.sharedmem.cuda import DeviceArray, DeviceParts
    from dl_inference.worker.runner import _concatenate

    raw = np.arange(4, dtype=np.float32).tobytes()
    device = DeviceArray(0x1000, np.dtype(np.uint8), (16,), 0, lambda: raw)
    request = _request(byte_size=16)
    request.inputs[0].shape[:] = [1, 4]
    typed = decode_inputs(request, lambda tensor, label: device)["x"]
    assert isinstance(typed, DeviceArray) and typed.dtype == np.float32 and typed.shape == (1, 4)
    assert typed.__cuda_array_interface__ == {"shape": (1, 4), "typestr": "<f4", "data": (0x1000, False), "version": 3}
    request.inputs[0].shape[:] = [1, 3]
    with pytest.raises(InvalidArgument, match="input 'x': expected 12 bytes for shape \\[1,3\\] FP32, got 16"):
        decode_inputs(request, lambda tensor, label: device)
    joined = _concatenate([typed, np.ones((2, 4), np.float32)])
    assert isinstance(joined, DeviceParts) and joined.shape == (3, 4)
    assert joined.to_host().tolist() == [[0, 1, 2, 3], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert isinstance(_concatenate([np.zeros((1, 4)), np.ones((1, 4))]), np.ndarray)
    # a backend that joins rows itself (PyTorch on a GPU) gets host rows unjoined too
    assert isinstance(_concatenate([np.zeros((1, 4)), np.ones((1, 4))], backend_joins=True), DeviceParts)


class _Pinning:
    def __init__(self) -> None:
        self.pinned: dict[int, int] = {}

    def pin_host_memory(self, address: int, nbytes: int) -> bool:
        self.pinned[address] = nbytes
        return True

    def unpin_host_memory(self, address: int) -> None:
        del self.pinned[address]


def test_system_regions_are_page_locked_once_for_a_gpu_backend(registry: SharedMemoryRegistry, tmp_path: Path) -> None:
    _file(tmp_path, "k", bytes(4096))
    registry.register_system("r", "k", 0, 4096)
    loc = registry.status(SYSTEM, "r")[0].location
    pinning = _Pinning()
    maps = RegionMaps(tmp_path, pinning=pinning)
    view = maps.read_input("r", loc, TensorRef("r", 16, 8), "input 'x'")
    maps.read_input("r", loc, TensorRef("r", 0, 8), "input 'x'")
    ((address, nbytes),) = pinning.pinned.items()
    assert nbytes == 4096 and np.frombuffer(view, np.uint8).ctypes.data == address + 16
    del view
    maps.forget([loc.generation])
    assert pinning.pinned == {}
