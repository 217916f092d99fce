"""Model versions: the numbered subdirectories of a model directory, and the policy choosing among them."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from dl_inference.errors import InvalidArgument
from dl_inference.protocol.generated import model_config_pb2

logger = logging.getLogger(__name__)

# As in Triton: a version directory is a positive number without leading zeros ("0", "01" are ignored).
_VERSION_RE = re.compile(r"[1-9][0-9]*")
_MAX_VERSION = 2**63 - 1


def list_versions(model_dir: Path) -> dict[int, Path]:
    """Version number -> directory for the numerically named subdirectories of ``model_dir``.

    Other entries (files, hidden or non-numeric names, numbers with leading zeros, numbers that do
    not fit in int64) are ignored. The result is ordered by version number.
    """
    found: dict[int, Path] = {}
    with os.scandir(model_dir) as entries:
        for entry in entries:
            if not _VERSION_RE.fullmatch(entry.name):
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks; scan checks where they lead
            except OSError:
                is_dir = False
            version = int(entry.name)
            if not is_dir or version > _MAX_VERSION:
                logger.debug("ignoring %s: not a version directory", entry.path)
                continue
            found[version] = Path(entry.path)
    return dict(sorted(found.items()))


def select_versions(available: dict[int, Path], policy: model_config_pb2.ModelVersionPolicy | None = None) -> list[int]:
    """The versions to serve, ascending, by Triton's version policy.

    No policy means ``latest { num_versions: 1 }``. ``all`` takes every available version,
    ``latest`` the ``num_versions`` highest, ``specific`` exactly the listed versions.

    Raises:
        InvalidArgument: ``latest`` with ``num_versions`` < 1, or ``specific`` naming versions
            that are not available (the message lists the missing and the available ones).
    """
    numbers = sorted(available)
    choice = policy.WhichOneof("policy_choice") if policy is not None else None
    if choice is None:
        return numbers[-1:]
    if choice == "all":
        return numbers
    if choice == "latest":
        n = policy.latest.num_versions  # type: ignore[union-attr]
        if n < 1:
            raise InvalidArgument("version_policy latest needs num_versions >= 1")
        return numbers[-n:]
    wanted = sorted(set(policy.specific.versions))  # type: ignore[union-attr]
    if not wanted:
        raise InvalidArgument("version_policy specific lists no versions")
    missing = [v for v in wanted if v not in available]
    if missing:
        raise InvalidArgument(
            f"version_policy specific asks for version(s) {', '.join(map(str, missing))} which do not "
            f"exist; available: {', '.join(map(str, numbers)) or 'none'}"
        )
    return wanted
