"""Frames over a real socket pair, and request routing from raw bytes."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from dl_inference.errors import InvalidArgument
from dl_inference.protocol.framing import ExecStats, FrameProtocol, Kind
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.protocol.wire import route_fields, stream_response


async def _pair() -> tuple[FrameProtocol, FrameProtocol, list[tuple], list[tuple]]:
    a_sock, b_sock = socket.socketpair()
    got_a: list[tuple] = []
    got_b: list[tuple] = []
    loop = asyncio.get_running_loop()
    _, a = await loop.create_connection(lambda: FrameProtocol(lambda *f: got_a.append(f), lambda e: None), sock=a_sock)
    _, b = await loop.create_connection(lambda: FrameProtocol(lambda *f: got_b.append(f), lambda e: None), sock=b_sock)
    return a, b, got_a, got_b


def test_frames_survive_any_chunking_and_keep_stats() -> None:
    async def main() -> None:
        a, _b, _, got_b = await _pair()
        big = bytes(range(256)) * 1000  # above the coalescing limit: written at once
        stats = ExecStats(1, 2, 3, 4, 5, 6, True)
        a.send(Kind.INFER, 7, b"hello")
        a.send(Kind.RESULT, 8, big, stats=stats)
        a.send(Kind.ERROR, 9, b"bad", code=3, stats=stats)
        a.send(Kind.CANCEL, 10, b"")
        for _ in range(100):
            if len(got_b) == 4:
                break
            await asyncio.sleep(0.01)
        kinds = [(k, rid, code) for k, rid, code, _, _ in got_b]
        assert kinds == [(Kind.INFER, 7, 0), (Kind.RESULT, 8, 0), (Kind.ERROR, 9, 3), (Kind.CANCEL, 10, 0)]
        assert got_b[0][3] is None and got_b[0][4] == b"hello"
        assert got_b[1][3] == stats and got_b[1][4] == big
        assert got_b[2][4] == b"bad"

    asyncio.run(main())


def test_byte_at_a_time_delivery() -> None:
    got: list[tuple] = []
    proto = FrameProtocol(lambda *f: got.append(f), lambda e: None)
    sink = FrameProtocol(lambda *f: None, lambda e: None)

    class Capture:
        data = b""

        def write(self, d: bytes) -> None:
            self.data += d

        def writelines(self, parts: list[bytes]) -> None:
            self.data += b"".join(parts)

        def is_closing(self) -> bool:
            return False

    capture = Capture()
    sink.transport = capture  # type: ignore[assignment]
    sink._dispatching = True  # queue without a running loop; flushed by hand below
    sink.send(Kind.INFER, 1, b"abc")
    sink.send(Kind.RESULT, 2, b"xyz", stats=ExecStats(queue_ns=9))
    sink.flush()
    for i in range(len(capture.data)):
        proto.data_received(capture.data[i : i + 1])
    assert [(f[0], f[1], f[4]) for f in got] == [(Kind.INFER, 1, b"abc"), (Kind.RESULT, 2, b"xyz")]
    assert got[1][3].queue_ns == 9


def test_route_fields_reads_name_and_version_only() -> None:
    req = pb.ModelInferRequest(model_name="m\u00e9", model_version="3", id="x")
    req.inputs.add(name="a", datatype="FP32", shape=[1, 2])
    req.raw_input_contents.append(b"\0" * 8)
    assert route_fields(req.SerializeToString()) == ("m\u00e9", "3")
    assert route_fields(b"") == ("", "")
    for bad in (b"\x0a\x05ab", b"\x0a", b"\x0f\x00", b"\xff" * 11):
        with pytest.raises(InvalidArgument):
            route_fields(bad)


def test_peek_walks_a_bounded_number_of_fields() -> None:
    """Past MAX_PEEK_FIELDS the walk stops and flags the request for the full decode (in a helper):
    millions of tiny unknown fields cannot keep the event loop busy."""
    from dl_inference.protocol.wire import MAX_PEEK_FIELDS, peek_request

    req = pb.ModelInferRequest(model_name="m", model_version="2")
    for i in range(MAX_PEEK_FIELDS - 3):
        req.inputs.add(name=f"x{i}", datatype="FP32", shape=[1])
    ok = req.SerializeToString()
    assert peek_request(ok) == ("m", "2", False)  # MAX_PEEK_FIELDS - 1 fields: walked to the end
    unknown = bytes([15 << 3, 1])  # field 15, varint 1
    assert peek_request(ok + unknown) == ("m", "2", False)  # exactly MAX_PEEK_FIELDS
    assert peek_request(ok + unknown * 2) == ("m", "2", True)  # one more: the careful path
    huge = pb.ModelInferRequest(model_name="m").SerializeToString() + unknown * 5_000_000
    t = time.perf_counter()
    assert peek_request(huge) == ("m", "", True)
    assert time.perf_counter() - t < 0.5  # walking 5 million fields in Python takes seconds
    # A name hidden after the budget is not the peek's to find: the full decode has the last word.
    assert peek_request(huge + pb.ModelInferRequest(model_name="other").SerializeToString())[:2] == ("m", "")


def test_stream_response_is_a_valid_message() -> None:
    inner = pb.ModelInferResponse(model_name="m", id="1").SerializeToString()
    msg = pb.ModelStreamInferResponse.FromString(stream_response(inner, ""))
    assert msg.infer_response.model_name == "m" and not msg.error_message
    msg = pb.ModelStreamInferResponse.FromString(stream_response(None, "boom" * 100))
    assert msg.error_message == "boom" * 100 and not msg.HasField("infer_response")


def test_ping_tells_a_busy_link_from_a_hung_worker() -> None:
    """A PONG queued behind a large frame is late, not missing: a link that moves is a live worker."""
    import threading
    import time
    from pathlib import Path

    from dl_inference.gateway.workers import WorkerInstance, WorkerSpec
    from dl_inference.protocol.framing import HEADER

    async def main() -> None:
        gw_sock, worker = socket.socketpair()
        inst = WorkerInstance(WorkerSpec(Path("."), "m", 1, 0))
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: FrameProtocol(inst.on_frame, lambda e: None), sock=gw_sock)
        inst.proto, inst.ready = proto, True

        assert not await inst.ping(0.2)  # idle and silent: hung

        proto.send(Kind.INFER, 1, b"x" * (32 << 20))
        assert proto.progress()[2] > 0  # the kernel's buffer is full; the rest waits on our side
        assert not await inst.ping(0.2)  # nobody reads it: hung

        stop = threading.Event()

        def read_slowly() -> None:
            while not stop.is_set():
                worker.recv(65536)
                time.sleep(0.002)

        reader = threading.Thread(target=read_slowly, daemon=True)
        reader.start()
        assert await inst.ping(0.2)  # the worker is taking the frame: busy, alive
        stop.set()
        reader.join()

        worker.setblocking(False)
        drained = 0
        while drained < 20:  # take the whole frame, then go quiet again
            try:
                worker.recv(1 << 20)
                drained = 0
            except BlockingIOError:
                drained += 1
                await asyncio.sleep(0.005)
        assert proto.progress()[2] == 0
        assert not await inst.ping(0.2)

        def write_slowly() -> None:  # a large RESULT frame trickling back: the worker writes, alive
            worker.sendall(HEADER.pack(64 << 20, 5, int(Kind.RESULT), 0))
            for _ in range(60):
                worker.sendall(b"y" * 4096)
                time.sleep(0.005)

        writer = threading.Thread(target=write_slowly, daemon=True)
        worker.setblocking(True)
        writer.start()
        assert await inst.ping(0.2)
        writer.join()
        proto.transport.close()
        worker.close()

    asyncio.run(main())


def test_large_frames_stream_in_order_with_small_ones_behind_them() -> None:
    """Frames from STREAM_FROM on go a chunk at a time as the socket drains; frames sent meanwhile
    (small, urgent, mid-sized) follow them whole and in order."""
    from dl_inference.protocol.framing import STREAM_FROM

    async def main() -> None:
        a, _b, _, got_b = await _pair()
        big = bytes(range(256)) * (3 * STREAM_FROM // 256 + 7)
        mid = b"m" * 100_000
        a.send(Kind.INFER, 1, b"first")
        a.send(Kind.INFER, 2, big)
        assert a.progress()[2] > 0  # not all of it is with the transport yet
        a.send(Kind.PING, 3, b"", urgent=True)
        a.send(Kind.INFER, 4, mid)
        a.send(Kind.RESULT, 5, big[::-1], stats=ExecStats())
        a.send(Kind.CANCEL, 6, b"")
        for _ in range(500):
            if len(got_b) == 6:
                break
            await asyncio.sleep(0.01)
        assert [(k, rid) for k, rid, *_ in got_b] == [
            (Kind.INFER, 1), (Kind.INFER, 2), (Kind.PING, 3), (Kind.INFER, 4), (Kind.RESULT, 5), (Kind.CANCEL, 6)
        ]  # fmt: skip
        assert got_b[1][4] == big and got_b[3][4] == mid and got_b[4][4] == big[::-1]
        assert got_b[4][3] == ExecStats()
        assert a.progress()[2] == 0

    asyncio.run(main())
