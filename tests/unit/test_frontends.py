"""Several frontends: the default count, settings checks, and merging counters across processes."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from dl_inference import config
from dl_inference.config import ServerSettings, auto_frontends, usable_cores
from dl_inference.errors import InvalidArgument, NotFound
from dl_inference.gateway.frontend_processes import Counters, _add, _dump, _error_payload, _load
from dl_inference.protocol.framing import ExecStats
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.stats import ModelStats


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (7, 1), (8, 2), (16, 4), (64, 8)])
def test_auto_frontends_is_a_quarter_of_the_cores_at_most_8(
    monkeypatch: pytest.MonkeyPatch, cores: int, expected: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(config, "Path", lambda p: _NoFile())  # no cgroup quota
    assert auto_frontends(8000, 8001) == expected
    assert auto_frontends(0, 8001) == 1  # a random port cannot be shared


class _NoFile:
    def read_text(self) -> str:
        raise OSError("none")


def test_a_cgroup_cpu_quota_bounds_the_cores(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(config, "Path", lambda p: quota)
    quota.write_text("250000 100000\n")  # 2.5 CPUs: a container limited to them
    assert usable_cores() == 3 and auto_frontends(8000, 8001) == 1
    quota.write_text("max 100000\n")
    assert usable_cores() == 64 and auto_frontends(8000, 8001) == 8


def test_frontends_setting_is_checked(tmp_path: object) -> None:
    base = {"model_repository": str(tmp_path)}
    with pytest.raises(InvalidArgument, match="frontends must be a whole number >= 0"):
        ServerSettings(**base, frontends=-1).validate()
    with pytest.raises(InvalidArgument, match="fixed --http-port and --grpc-port"):
        ServerSettings(**base, frontends=2, grpc_port=0).validate()
    settings = ServerSettings(**base)  # 0: resolved by validate
    settings.validate()
    assert settings.frontends == auto_frontends(settings.http_port, settings.grpc_port)


def _stats(n: int, reason: str | None = None) -> ModelStats:
    s = ModelStats()
    for _ in range(n):
        s.record_success(1000, ExecStats(10, 20, 30, 40, 2, 4, True))
    if reason:
        s.record_failure(500, reason)
    return s


def test_merged_statistics_add_up_every_counter() -> None:
    a, b, c = _stats(3), _stats(2, "REJECTED"), _stats(1, "REJECTED")
    m = a.merged([b, c])
    assert m.inference_count == 12 and m.execution_count == 6  # 2 rows per request
    assert (m.success.count, m.success.ns) == (6, 6000)
    assert (m.fail.count, m.failures_by_reason) == (2, {"REJECTED": 2})
    assert m.batches[4].compute_infer.count == 6 and m.batches[4].compute_infer.ns == 180
    assert m.last_inference_ms == max(a.last_inference_ms, b.last_inference_ms, c.last_inference_ms)
    assert a.success.count == 3 and a.merged([]) is a  # the parts are untouched


def test_counters_of_departed_frontends_are_kept_by_key() -> None:
    key, other = ("m", 1, 7), ("m", 1, 8)  # same model, another serial (a reload)
    total = _add(Counters({key: _stats(2)}, 2), Counters({key: _stats(3), other: _stats(1)}, 4))
    assert total.requests == 6 and total.models[key].success.count == 5 and total.models[other].success.count == 1


def test_control_payloads_carry_protobuf_messages_and_error_codes() -> None:
    index = pb.RepositoryIndexResponse()
    index.models.add(name="m", version="1", state="READY")
    assert _load(_dump(index)) == index  # the generated classes do not pickle on their own
    err = pickle.loads(_error_payload(NotFound("unknown model 'x'")))
    assert isinstance(err, NotFound) and err.message == "unknown model 'x'"
    internal = pickle.loads(_error_payload(ValueError("boom")))
    assert internal.code.name == "INTERNAL" and "ValueError: boom" in internal.message


def test_the_control_socket_unpickles_nothing_before_the_token_matched(tmp_path: Path) -> None:
    """A stranger's HELLO (a pickle that would run code, a bad token, garbage) closes the connection."""
    import asyncio

    from dl_inference.gateway.frontend_processes import FrontendSupervisor
    from dl_inference.protocol.framing import HEADER, Kind, pack_token

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'owned'}",))

    class FakeDp:
        class pool:
            directory = str(tmp_path)

    async def main() -> None:
        settings = ServerSettings(model_repository=str(tmp_path), frontends=2)
        sup = FrontendSupervisor(FakeDp(), settings)  # type: ignore[arg-type]
        sup._server = await asyncio.get_running_loop().create_unix_server(sup._accept, sup.path)
        for payload in (pickle.dumps(Evil()), pack_token("wrong", b"1"), b"\x01", pack_token(sup.token, b"7")):
            reader, writer = await asyncio.open_unix_connection(sup.path)
            writer.write(HEADER.pack(len(payload), 0, int(Kind.HELLO), 0) + payload)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
            writer.close()
        # The right token and index: the settings come back.
        reader, writer = await asyncio.open_unix_connection(sup.path)
        payload = pack_token(sup.token, b"1")
        writer.write(HEADER.pack(len(payload), 0, int(Kind.HELLO), 0) + payload)
        header = await asyncio.wait_for(reader.readexactly(HEADER.size), 5)
        assert HEADER.unpack(header)[2] == int(Kind.ANSWER)
        writer.close()
        sup._server.close()

    asyncio.run(main())
    assert not (tmp_path / "owned").exists()
