"""Processes as /proc shows them (Linux): parents and descendants, resident memory, CPU time of a
process tree or group, and the whole machine's busy time."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any


def ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])  # after "pid (comm) state"


def child_pids(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and ppid(int(entry.name)) == pid:
            out.append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children...), from /proc."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = ppid(int(entry.name))
            if parent is not None:
                parents[parent].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rss_bytes(pid: int) -> int | None:
    """Resident set size of one process (VmRSS), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return 0  # a zombie has no VmRSS


def tree_rss(pid: int) -> dict[str, Any]:
    """RSS of ``pid`` (the gateway) and of all its descendants (its workers), in bytes."""
    kids = descendants(pid)
    own = rss_bytes(pid)
    workers = [r for r in (rss_bytes(k) for k in kids) if r is not None]
    return {
        "gateway": own,
        "workers": sum(workers),
        "total": (own or 0) + sum(workers),
        "processes": 1 + len(workers) if own is not None else len(workers),
    }


def proc_stats() -> dict[int, tuple[int, int, int]]:
    """{pid: (ppid, pgrp, utime + stime ticks)} of every live process, from /proc."""
    out: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # after "pid (comm) ": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        fields = stat[stat.rfind(b")") + 2 :].split()
        out[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[11]) + int(fields[12]))
    return out


def tree_cpu_seconds(root_pids: list[int]) -> dict[int, float]:
    """{root pid: user + system CPU seconds of its live process tree}.

    The tree is the process, its descendants (by parent pid) and its process group: our workers
    run in sessions of their own, MLServer's in the server's group."""
    stats = proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    hz = os.sysconf("SC_CLK_TCK")
    result: dict[int, float] = {}
    for root in root_pids:
        seen = {pid for pid, (_, pgrp, _) in stats.items() if pgrp == root}
        todo = [root]
        while todo:
            pid = todo.pop()
            if pid in stats:
                seen.add(pid)
                todo.extend(children.get(pid, []))
        result[root] = sum(stats[pid][2] for pid in seen if pid in stats) / hz
    return result


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid`` (from /proc)."""
    return sum(ticks for _, pgrp, ticks in proc_stats().values() if pgrp == pgid) / os.sysconf("SC_CLK_TCK")


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)
