"""Atomic writes of converted files: whole files only, readable by another user, nothing left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dl_inference.convert import filecache
from dl_inference.convert.filecache import atomic_write_bytes, atomic_write_text, new_file_mode, write_beside


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def test_a_new_file_gets_the_umask_mode_not_mkstemps_0600(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "model.plan"
    atomic_write_bytes(target, b"engine")
    assert target.read_bytes() == b"engine"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert [p.name for p in target.parent.iterdir()] == ["model.plan"]


def test_a_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx.json"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new ü")
    assert target.read_text(encoding="utf-8") == "new ü"
    assert target.stat().st_mode & 0o777 == 0o640
    assert new_file_mode(tmp_path / "missing") == 0o666 & ~_umask()


def test_write_beside_leaves_the_target_alone_until_renamed(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    tmp = write_beside(target, memoryview(b"new"))
    assert tmp.parent == tmp_path and tmp.name.startswith(".model.onnx.")
    assert target.read_bytes() == b"old"
    os.replace(tmp, target)
    assert target.read_bytes() == b"new"


def test_a_failed_rename_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(filecache.os, "replace", refuse)
    with pytest.raises(OSError, match="cross-device"):
        atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert list(tmp_path.iterdir()) == []
