"""Length-prefixed frames for the gateway <-> local worker hop (a Unix socket).

The hop is on every request's path, so it is deliberately not gRPC (see DESIGN.md: a gRPC hop
cost ~0.7 ms here, plain frames ~0.2 ms). Many requests are in flight on one connection; each
frame carries the request id it belongs to.

Frame = header ``<IQBB2x`` (payload length, request id, kind, error code) + payload.

* ``HELLO``      worker -> gateway, once, after the model loaded: token + completed ModelConfig.
* ``LOAD_FAILED`` worker -> gateway, instead of HELLO: token + utf-8 reason; the worker then exits.
* ``INFER``      gateway -> worker: serialized ``ModelInferRequest`` (the client's bytes, untouched).
* ``RESULT``     worker -> gateway: :data:`STATS` block + serialized ``ModelInferResponse``.
* ``ERROR``      worker -> gateway: :data:`STATS` block + utf-8 message; ``code`` is errors.WIRE_CODE.
* ``CANCEL``     gateway -> worker: the client went away; drop the request if it has not run yet.
* ``FORGET_REGIONS`` gateway -> worker: shared-memory registrations that are gone (JSON list of
  generations); the worker unmaps them.
* ``ATTACH``, ``CALL``, ``ANSWER``, ``SNAPSHOT``, ``COLLECT``: several frontends (see
  :mod:`dl_inference.gateway.frontend_processes`).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# The environment variable a spawned worker finds its HELLO token in (the command line is world-readable).
WORKER_TOKEN_ENV = "DL_INFERENCE_WORKER_TOKEN"

HEADER = struct.Struct("<IQBB2x")
# queue_ns, compute_input_ns, compute_infer_ns, compute_output_ns, the request's own rows, the batch
# size of the execution it ran in, 1 if this request accounts for that execution (one per batch).
STATS = struct.Struct("<QQQQIIB3x")
TOKEN_LEN = struct.Struct("<H")
MAX_PAYLOAD = 0xFFFFFFFF
# Payloads from this size on are written a chunk at a time as the socket drains (pause_writing /
# resume_writing), never handed to the transport whole: a transport that buffers 90 MB copies it in one
# go with the GIL held, and every other request on the loop waits.
STREAM_FROM = 1 << 20
CHUNK = 256 << 10


class Kind(enum.IntEnum):
    HELLO = 1
    LOAD_FAILED = 2
    INFER = 3
    RESULT = 4
    ERROR = 5
    CANCEL = 6
    PING = 7  # gateway -> worker health probe; answered with PONG and the same id
    PONG = 8
    FORGET_REGIONS = 9
    # Several frontends (``serve --frontends N``): each extra frontend process opens its own connection
    # to every worker and talks to the supervising gateway over a control connection.
    ATTACH = 10  # frontend -> worker, first frame on a worker's --listen socket: its token
    CALL = 11  # frontend -> supervisor: a pickled (method, args) for the server-wide data plane
    ANSWER = 12  # supervisor -> frontend (or frontend -> supervisor for COLLECT): pickled result; code 1 = error
    SNAPSHOT = 13  # supervisor -> frontend: the pickled model table (what to route to, and where)
    COLLECT = 14  # supervisor -> frontend: send your statistics (answered with ANSWER)


@dataclass(slots=True)
class ExecStats:
    """Server-side timings of one request, reported by the worker with its result."""

    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    rows: int = 0
    batch_size: int = 0
    counts_execution: bool = False

    def pack(self) -> bytes:
        return STATS.pack(
            self.queue_ns,
            self.compute_input_ns,
            self.compute_infer_ns,
            self.compute_output_ns,
            self.rows,
            self.batch_size,
            1 if self.counts_execution else 0,
        )


def pack_token(token: str, body: bytes) -> bytes:
    raw = token.encode()
    return TOKEN_LEN.pack(len(raw)) + raw + body


def unpack_token(payload: bytes) -> tuple[str, bytes]:
    (n,) = TOKEN_LEN.unpack_from(payload, 0)
    start = TOKEN_LEN.size
    return payload[start : start + n].decode(), payload[start + n :]


# (kind, request id, error code, exec stats for RESULT/ERROR frames else None, payload)
FrameHandler = Callable[[Kind, int, int, "ExecStats | None", bytes], None]
_WITH_STATS = (Kind.RESULT, Kind.ERROR)


class FrameProtocol(asyncio.Protocol):
    """asyncio protocol that splits a byte stream into frames and hands each to ``on_frame``.

    RESULT and ERROR frames start with a :data:`STATS` block, unpacked here so the payload that
    reaches ``on_frame`` is exactly the response bytes (no second copy). ``on_frame`` runs on the
    event loop; ``on_lost(exc)`` once when the connection ends. Both may be reassigned, e.g. when a
    connection is matched to the worker that opened it.
    """

    def __init__(self, on_frame: FrameHandler, on_lost: Callable[[Exception | None], None]) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self._buf = bytearray()
        self._need = HEADER.size
        self._out: list[bytes] = []
        self._dispatching = False
        self._received = 0  # bytes read from the peer
        self._written = 0  # bytes handed to the transport
        self._streaming: collections.deque[memoryview] = collections.deque()  # waits for the socket to drain
        self._streaming_bytes = 0
        self._paused = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def progress(self) -> tuple[int, int, int]:
        """(bytes received, bytes the kernel has taken from us, bytes still waiting in our buffer).

        A peer busy with a large frame cannot answer a ping queued behind it, yet it is alive: two
        readings tell a slow transfer from a hung peer. Bytes received prove the peer writes; bytes
        taken while our buffer was non-empty prove it reads (the kernel's buffer was full, so only
        the peer's reads make room). Writes into a kernel buffer with room prove nothing.
        """
        transport = self.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return self._received, self._written - buffered, buffered + self._streaming_bytes

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    def _stream(self, data: bytes) -> None:
        """Queue bytes behind the large frame being streamed (whole frames keep their order)."""
        self._streaming.append(memoryview(data))
        self._streaming_bytes += len(data)

    def _pump(self) -> None:
        streaming = self._streaming
        while streaming and not self._paused:
            transport = self.transport
            if transport is None or transport.is_closing():
                streaming.clear()
                self._streaming_bytes = 0
                return
            head = streaming[0]
            if len(head) > CHUNK:
                chunk, streaming[0] = head[:CHUNK], head[CHUNK:]
            else:
                chunk = streaming.popleft()
            self._streaming_bytes -= len(chunk)
            self._written += len(chunk)
            transport.write(chunk)  # may pause us at once

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        buf = self._buf
        buf += data
        if len(buf) < self._need:
            return
        offset = 0
        end_all = len(buf)
        hsize = HEADER.size
        frames = []
        with memoryview(buf) as view:
            while end_all - offset >= hsize:
                length, rid, kind, code = HEADER.unpack_from(buf, offset)
                end = offset + hsize + length
                if end > end_all:
                    self._need = end - offset
                    break
                start = offset + hsize
                stats = None
                if kind in _WITH_STATS:
                    stats = ExecStats(*STATS.unpack_from(buf, start))
                    start += STATS.size
                frames.append((kind, rid, code, stats, bytes(view[start:end])))
                offset = end
            else:
                self._need = hsize
        if offset:
            del buf[:offset]
        # Replies produced while handling these frames leave together, right after (no extra loop turn).
        self._dispatching = True
        try:
            for kind, rid, code, stats, payload in frames:
                try:
                    self.on_frame(Kind(kind), rid, code, stats, payload)
                except Exception:  # a handler bug must not kill the connection
                    log.exception("frame handler failed (kind=%s id=%s)", kind, rid)
        finally:
            self._dispatching = False
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._streaming.clear()
        self._streaming_bytes = 0
        self.on_lost(exc)

    def send(
        self,
        kind: Kind,
        rid: int,
        payload: bytes,
        code: int = 0,
        stats: ExecStats | None = None,
        urgent: bool = False,
    ) -> bool:
        """Queue one frame; False if the connection is gone. RESULT/ERROR frames need ``stats``.

        Small frames queued during one event-loop iteration leave in one write (one syscall, one
        wake-up on the other side) instead of one each; under load that is most of this hop's cost.
        ``urgent`` writes at once instead (the sender knows nothing else is coming: low load).
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        prefix = b""
        if kind in _WITH_STATS:
            prefix = (stats or ExecStats()).pack()
        header = HEADER.pack(len(prefix) + len(payload), rid, int(kind), code) + prefix
        if len(payload) >= STREAM_FROM or (self._streaming and len(payload) >= 65536):
            self.flush()
            self._stream(header)
            self._stream(payload)
            self._pump()
            return True
        if len(payload) >= 65536:
            self.flush()
            transport.writelines((header, payload))
            self._written += len(header) + len(payload)
            return True
        if urgent and not self._out and not self._dispatching and not self._streaming:
            transport.write(header + payload)
            self._written += len(header) + len(payload)
            return True
        if not self._out and not self._dispatching:
            asyncio.get_running_loop().call_soon(self.flush)
        self._out.append(header + payload)
        return True

    def flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out = []
        transport = self.transport
        if transport is not None and not transport.is_closing():
            data = out[0] if len(out) == 1 else b"".join(out)
            if self._streaming:  # behind the frame being streamed
                self._stream(data)
                self._pump()
                return
            transport.write(data)
            self._written += len(data)
