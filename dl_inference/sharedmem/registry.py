"""The gateway's registry of shared-memory regions: register, check every use, pin, forget.

Nothing here maps a region: the gateway checks requests against the registry and hands the
regions' locations to the worker that runs the request (:func:`.params.encode_locations`).

Safety rules (Triton has had advisories on each):

* A system key is a bare /dev/shm name (an optional leading ``/``, then letters, digits, ``_ . -``,
  not starting with a dot): no paths, no ``..``. The file is opened without following links and
  must be a regular file at least ``offset + byte_size`` long.
* Every use is checked: ``offset + byte_size`` of a tensor must lie inside its region.
* A region is pinned while a request uses it; unregistering it then is FAILED_PRECONDITION.
* Regions whose client is gone are forgotten by :meth:`SharedMemoryRegistry.sweep`: a system region
  whose /dev/shm file was removed or replaced, or that no process outside this server maps or holds
  open any more after one was seen doing so (checked through /proc for files owned by this server's
  user; a client in another PID namespace or of another user is not visible, and for its regions
  only removal is detected). CUDA regions are forgotten only when unregistered: nothing on the host
  tells whether the exporting process still lives.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dl_inference.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from dl_inference.protocol.generated import grpc_service_pb2 as pb
from dl_inference.sharedmem.params import (
    CUDA,
    LOCATIONS,
    SYSTEM,
    Location,
    encode_locations,
    request_refs,
)

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
CUDA_IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
_KEY = re.compile(r"/?[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,254}")


def check_key(key: str) -> str:
    """The /dev/shm file name of a system key; InvalidArgument unless it is a bare name."""
    if not _KEY.fullmatch(key):
        raise InvalidArgument(
            f"shared-memory key {key!r} is not a /dev/shm name: use letters, digits, '_', '.', '-' "
            "(an optional leading '/'; no other '/', not starting with '.')"
        )
    return key.lstrip("/")


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    location: Location
    device: int = 0  # st_dev of a system region's file (with location.inode: its identity)
    owner_uid: int = -1
    key: str = ""  # a system region's key as the client gave it

    def status(self) -> dict[str, Any]:
        """The region as Triton's status reports it (the fields of its RegionStatus message, both kinds)."""
        loc = self.location
        if loc.kind == SYSTEM:
            return {"name": self.name, "key": self.key, "offset": loc.offset, "byte_size": loc.byte_size}
        return {"name": self.name, "device_id": loc.device_id, "byte_size": loc.byte_size}


class SharedMemoryRegistry:
    """Registered regions of both kinds, by name; one per server (the gateway's)."""

    def __init__(self, shm_dir: Path = SHM_DIR, own_pids: Callable[[], Iterable[int]] = lambda: ()) -> None:
        self.shm_dir = shm_dir
        self.own_pids = own_pids  # this server's processes: their mappings do not keep a region alive
        self.regions: dict[str, dict[str, Region]] = {SYSTEM: {}, CUDA: {}}
        self.in_use: Counter[str] = Counter()  # (name) -> requests using it now
        self._generations = itertools.count(1)
        self._orphan_seen: set[int] = set()  # generations found orphaned by the previous sweep
        # generations some process outside the server was once seen holding: only these can be found
        # orphaned (a client in another PID namespace, sharing /dev/shm, is never visible in /proc)
        self._tracked: set[int] = set()
        self.on_forget: Callable[[list[int]], None] = lambda generations: None

    # -- registration -----------------------------------------------------------------------
    def _check_new(self, name: str) -> None:
        if not name:
            raise InvalidArgument("a shared-memory region needs a non-empty name")
        for kind, regions in self.regions.items():
            if name in regions:
                raise AlreadyExists(f"shared-memory region '{name}' is already registered ({kind})")

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_new(name)
        filename = check_key(key)
        if byte_size <= 0:
            raise InvalidArgument(f"shared-memory region '{name}': byte_size must be positive, got {byte_size}")
        path = self.shm_dir / filename
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidArgument(f"shared-memory region '{name}': no shared-memory object {key!r}") from None
        except OSError as exc:
            raise InvalidArgument(f"shared-memory region '{name}': cannot open {key!r}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"shared-memory region '{name}': {key!r} is not a shared-memory object")
        if offset + byte_size > st.st_size:
            raise InvalidArgument(
                f"shared-memory region '{name}': offset {offset} + byte_size {byte_size} exceeds the "
                f"{st.st_size} bytes of {key!r}"
            )
        loc = Location(SYSTEM, next(self._generations), byte_size, key=filename, offset=offset, inode=st.st_ino)
        self.regions[SYSTEM][name] = Region(name, loc, st.st_dev, st.st_uid, key)
        log.info("registered system shared memory '%s' (%s, %d bytes at %d)", name, key, byte_size, offset)

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self._check_new(name)
        if len(raw_handle) != CUDA_IPC_HANDLE_BYTES:
            raise InvalidArgument(
                f"CUDA shared-memory region '{name}': raw_handle must be a {CUDA_IPC_HANDLE_BYTES}-byte "
                f"cudaIpcMemHandle_t, got {len(raw_handle)} bytes"
            )
        if device_id < 0:
            raise InvalidArgument(f"CUDA shared-memory region '{name}': device_id must not be negative")
        if byte_size <= 0:
            raise InvalidArgument(f"CUDA shared-memory region '{name}': byte_size must be positive, got {byte_size}")
        loc = Location(CUDA, next(self._generations), byte_size, device_id=device_id, handle=bytes(raw_handle))
        self.regions[CUDA][name] = Region(name, loc)
        log.info("registered CUDA shared memory '%s' (device %d, %d bytes)", name, device_id, byte_size)

    def unregister(self, kind: str, name: str) -> None:
        """Forget region ``name`` of ``kind`` ("" = every region of that kind); unknown names are fine
        (as in Triton). FAILED_PRECONDITION, forgetting nothing, while a request uses one of them."""
        regions = self.regions[kind]
        names = [name] if name else list(regions)
        busy = [n for n in names if n in regions and self.in_use[n]]
        if busy:
            raise FailedPrecondition(
                f"cannot unregister shared-memory region(s) {', '.join(repr(n) for n in busy)}: "
                f"{sum(self.in_use[n] for n in busy)} request(s) in flight use them"
            )
        self._forget([regions.pop(n) for n in names if n in regions])

    def _forget(self, gone: list[Region]) -> None:
        if gone:
            for region in gone:
                log.info("unregistered shared memory '%s'", region.name)
            self.on_forget([r.location.generation for r in gone])

    def status(self, kind: str, name: str) -> list[Region]:
        regions = self.regions[kind]
        if not name:
            return list(regions.values())
        if name not in regions:
            raise NotFound(f"no {kind} shared-memory region '{name}' is registered")
        return [regions[name]]

    # -- use by requests ----------------------------------------------------------------------
    def attach(self, request: pb.ModelInferRequest) -> tuple[bytes, list[str]]:
        """Check every shared-memory reference of ``request`` against the registry.

        Returns the bytes to append to the serialized request (the regions' locations) and the names
        it pins, to hand back to :meth:`release` when the request is answered.
        """
        if LOCATIONS in request.parameters:
            raise InvalidArgument(f"request parameter '{LOCATIONS}' is reserved for the server")
        used: dict[str, Location] = {}
        for (kind, tensor), ref in request_refs(request).items():
            region = self.regions[SYSTEM].get(ref.region) or self.regions[CUDA].get(ref.region)
            if region is None:
                raise InvalidArgument(f"{kind} '{tensor}': shared-memory region '{ref.region}' is not registered")
            size = region.location.byte_size
            if ref.offset + ref.byte_size > size:
                raise InvalidArgument(
                    f"{kind} '{tensor}': shared_memory_offset {ref.offset} + shared_memory_byte_size "
                    f"{ref.byte_size} exceeds the {size} bytes of region '{ref.region}'"
                )
            used[ref.region] = region.location
        names = list(used)
        self.in_use.update(names)
        return encode_locations(used), names

    def release(self, names: list[str]) -> None:
        self.in_use.subtract(names)
        for name in names:
            if self.in_use[name] <= 0:
                del self.in_use[name]

    # -- clients that went away ---------------------------------------------------------------
    def holders(self) -> set[tuple[int, int]] | None:
        """The files processes outside this server map or hold open (None: unknown). Blocking (reads
        /proc): run it off the event loop, then hand the result to :meth:`sweep`."""
        uids = {r.owner_uid for r in self.regions[SYSTEM].values()}
        if not uids:
            return set()
        return _held_files({os.getpid(), *self.own_pids()}, uids)

    def sweep(self, held: set[tuple[int, int]] | None) -> list[str]:
        """Forget system regions whose client is gone (see the module docstring); their names.

        ``held`` comes from :meth:`holders`. A region is forgotten for being unheld only once a
        process outside the server was seen holding it (a client this server can see), and then only
        when it looks unheld on two sweeps in a row. Regions in use are kept.
        """
        gone: list[Region] = []
        orphans: set[int] = set()
        for region in list(self.regions[SYSTEM].values()):
            loc = region.location
            if self.in_use[region.name]:  # kept; its client is busy with it, so it is visible if it can be
                if held is not None and (region.device, loc.inode) in held:
                    self._tracked.add(loc.generation)
                continue
            try:
                st = os.stat(self.shm_dir / loc.key, follow_symlinks=False)
                replaced = (st.st_dev, st.st_ino) != (region.device, loc.inode)
            except FileNotFoundError:
                replaced = True
            if replaced:
                gone.append(region)
            elif held is None or region.owner_uid != os.geteuid():
                continue
            elif (region.device, loc.inode) in held:
                self._tracked.add(loc.generation)  # its client is visible here: we will see it go
            elif loc.generation in self._tracked:
                if loc.generation in self._orphan_seen:
                    gone.append(region)
                else:
                    orphans.add(loc.generation)
        self._orphan_seen = orphans
        for region in gone:
            self.regions[SYSTEM].pop(region.name, None)
            self._tracked.discard(region.location.generation)
            log.warning("forgetting shared-memory region '%s': its client is gone", region.name)
        self._forget(gone)
        return [r.name for r in gone]


def _held_files(own: set[int], uids: set[int]) -> set[tuple[int, int]] | None:
    """(st_dev, st_ino) of every file that a process outside ``own`` of our user maps or holds open.

    None when /proc cannot be read (not Linux): then nothing is forgotten for being unheld.
    """
    me = os.geteuid()
    if me not in uids:
        return set()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    held: set[tuple[int, int]] = set()
    for pid in pids:
        if pid in own:
            continue
        base = f"/proc/{pid}"
        try:
            if os.stat(base).st_uid != me:
                continue
            with open(f"{base}/maps", "rb") as maps:
                for line in maps:
                    _add_mapping(held, line)
            for entry in os.listdir(f"{base}/fd"):
                _add(held, f"{base}/fd/{entry}")
        except OSError:  # the process ended meanwhile, or /proc hides it
            continue
    return held


def _add_mapping(held: set[tuple[int, int]], line: bytes) -> None:
    """One /proc/<pid>/maps line: ``start-end perms offset major:minor inode path``."""
    fields = line.split(maxsplit=5)
    if len(fields) < 6 or fields[4] == b"0":
        return
    major, _, minor = fields[3].partition(b":")
    try:
        held.add((os.makedev(int(major, 16), int(minor, 16)), int(fields[4])))
    except ValueError:
        return


def _add(held: set[tuple[int, int]], link: str) -> None:
    try:
        st = os.stat(link)
    except OSError:
        return
    held.add((st.st_dev, st.st_ino))
