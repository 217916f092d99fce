"""Scanning a model repository: ``<root>/<model>/{config.pbtxt|config.yaml}`` + ``<root>/<model>/<version>/``.

A scan never lets one broken model hide the others: :func:`scan_repository` returns the good models
and a reason per bad one. Paths are confined to the repository: a model or version directory (or a
config file) that is, or passes through, a symlink leading outside the root is refused. Files
*inside* a version directory may link anywhere (shared weight stores are common).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from dl_inference.errors import InvalidArgument, NotFound, ServerError
from dl_inference.repository.config import (
    ModelConfig,
    backend_name,
    config_file,
    load_model_config,
    validate_config,
)
from dl_inference.repository.versions import list_versions, select_versions

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 255


@dataclass(frozen=True)
class ModelSource:
    """One model found in the repository, as of one scan.

    ``path`` and ``versions`` are resolved paths inside the repository; ``versions`` holds only the
    versions selected by the version policy. ``config`` is validated, has ``name`` set and, when it
    named neither platform nor backend, ``backend`` filled with the backend inferred from the files.
    ``fingerprint`` changes whenever the config file or any file in a selected version changes
    (contents of the config; relative path, size and mtime of version files), or the selection does.
    """

    name: str
    path: Path
    config: ModelConfig
    versions: dict[int, Path]
    fingerprint: str


def validate_model_name(name: str) -> None:
    """Refuse model names that are not a single safe path component.

    Raises:
        InvalidArgument: empty, too long, containing '/', '\\\\', '..' or NUL, or starting with '.'.
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgument("model name must be a non-empty string")
    problem = None
    if len(name) > MAX_NAME_LENGTH:
        problem = f"is longer than {MAX_NAME_LENGTH} characters"
    elif "\0" in name:
        problem = "contains a NUL character"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator ('/' or '\\')"
    elif ".." in name:
        problem = "contains '..'"
    elif name.startswith("."):
        problem = "starts with '.'"
    if problem:
        raise InvalidArgument(f"invalid model name {name[:80]!r}: it {problem}")


def resolve_inside(root: Path, *parts: str | os.PathLike[str]) -> Path:
    """``root/parts...`` resolved (symlinks followed), refused unless it stays inside ``root``.

    The target need not exist. Raises InvalidArgument for a path that leaves the repository.
    """
    try:
        root_resolved = Path(root).resolve()
        target = root_resolved.joinpath(*parts).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop, NUL byte, ...
        raise InvalidArgument(f"cannot resolve {'/'.join(map(str, parts))!r} in {root}: {e}") from e
    if not target.is_relative_to(root_resolved):
        raise InvalidArgument(f"path {'/'.join(map(str, parts))!r} leads outside the model repository {root_resolved}")
    return target


def scan_repository(root: Path) -> tuple[dict[str, ModelSource], dict[str, str]]:
    """Every model in ``root``: ``(models by name, reasons by name for models that failed)``.

    Hidden entries and plain files at the top level are skipped silently.

    Raises:
        NotFound: ``root`` does not exist or is not a directory (nothing else raises).
    """
    root_resolved = _repository_root(root)
    models: dict[str, ModelSource] = {}
    errors: dict[str, str] = {}
    with os.scandir(root_resolved) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        try:
            if not entry.is_dir():
                continue
            validate_model_name(name)
            models[name] = _load_source(root_resolved, name, resolve_inside(root_resolved, name))
        except ServerError as e:
            errors[name] = e.message
            logger.warning("model repository %s: skipping model '%s': %s", root_resolved, name, e.message)
        except Exception as e:  # one bad model must never stop the scan
            errors[name] = f"unexpected error while scanning: {type(e).__name__}: {e}"
            logger.exception("model repository %s: unexpected error scanning model '%s'", root_resolved, name)
    logger.debug("scanned %s: %d model(s), %d error(s)", root_resolved, len(models), len(errors))
    return models, errors


def scan_model(root: Path, name: str) -> ModelSource:
    """Scan one model by name (for an explicit load).

    Raises:
        NotFound: no repository at ``root`` or no directory ``name`` in it.
        InvalidArgument: bad name, path leaving the repository, bad config, or no usable version.
    """
    validate_model_name(name)
    root_resolved = _repository_root(root)
    if not os.path.lexists(root_resolved / name):
        raise NotFound(f"model '{name}' is not in the model repository {root_resolved}")
    model_dir = resolve_inside(root_resolved, name)
    if not model_dir.is_dir():
        raise NotFound(f"model '{name}': {root_resolved / name} is not a directory")
    return _load_source(root_resolved, name, model_dir)


def _repository_root(root: Path) -> Path:
    resolved = Path(root).resolve()
    if not resolved.is_dir():
        raise NotFound(f"model repository {root} does not exist or is not a directory")
    return resolved


def _load_source(root: Path, name: str, model_dir: Path) -> ModelSource:
    digest = hashlib.sha256()
    cfg_path = config_file(model_dir)
    if cfg_path is not None:
        resolve_inside(root, name, cfg_path.name)
    # Hash the config before parsing it: a change racing the scan then shows up at the next poll.
    _hash_config(digest, cfg_path)
    config = load_model_config(model_dir, name=name)
    validate_config(config)

    available = list_versions(model_dir)
    if not available:
        raise InvalidArgument(f"model '{name}' has no version directories (numbered subdirectories such as '{name}/1')")
    policy = config.version_policy if config.HasField("version_policy") else None
    try:
        selected = select_versions(available, policy)
    except InvalidArgument as e:
        raise InvalidArgument(f"model '{name}': {e.message}") from e
    versions = {v: resolve_inside(root, name, str(v)) for v in selected}

    backends = {backend_name(config, vdir) for vdir in versions.values()}
    if len(backends) > 1:
        raise InvalidArgument(
            f"model '{name}': its versions hold models for different backends "
            f"({', '.join(sorted(backends))}); set 'backend' in its config"
        )
    if not config.platform and not config.backend:
        config.backend = backends.pop()

    for version, vdir in versions.items():
        digest.update(f"\0version\0{version}\0".encode())
        for rel, size, mtime_ns in _walk(vdir):
            digest.update(os.fsencode(rel) + f"\0{size}\0{mtime_ns}\0".encode())
    return ModelSource(name, model_dir, config, versions, digest.hexdigest())


def _hash_config(digest: hashlib._Hash, path: Path | None) -> None:
    if path is None:
        digest.update(b"config\0none\0")
        return
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e}") from e
    digest.update(f"config\0{path.name}\0{len(data)}\0".encode() + data)


def _walk(top: Path) -> list[tuple[str, int, int]]:
    """Sorted ``(relative path, size, mtime_ns)`` of everything under ``top``, symlinks followed.

    Directories appear with a trailing '/' and size/mtime -1 (their files carry the changes);
    unreadable entries appear with -1, so their (dis)appearance still changes the fingerprint.
    """
    out: list[tuple[str, int, int]] = []
    seen: set[str] = set()
    stack: list[tuple[Path, str]] = [(top, "")]
    while stack:
        directory, rel = stack.pop()
        real = os.path.realpath(directory)
        if real in seen:  # symlink cycle or the same directory linked twice
            continue
        seen.add(real)
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            out.append((rel + "/?", -1, -1))
            continue
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                st = entry.stat()
            except OSError:
                out.append((path, -1, -1))
                continue
            if stat.S_ISDIR(st.st_mode):
                out.append((path + "/", -1, -1))
                stack.append((Path(entry.path), path))
            else:
                out.append((path, st.st_size, st.st_mtime_ns))
    out.sort()
    return out
