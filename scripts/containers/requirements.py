"""Print this package's dependencies from pyproject.toml, one per line, for `pip install -r` in an image build.

The images install the dependencies before they copy the source, so that editing the code does not re-download
them; this keeps the list in pyproject.toml only. ``--without NAME`` leaves a distribution out (the gateway image
leaves out what only workers import: onnx, onnxruntime, pillow); ``--extra NAME`` adds an optional group.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, extras: list[str], without: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    dropped = {_canonical(n) for n in without}
    out = []
    for req in wanted:
        match = _NAME.match(req)
        if match is None:
            raise SystemExit(f"cannot read a name in requirement {req!r}")
        if _canonical(match.group(1)) not in dropped and req not in out:
            out.append(req)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("pyproject", type=Path)
    p.add_argument("--extra", action="append", default=[], help="also an optional-dependencies group")
    p.add_argument("--without", action="append", default=[], help="leave this distribution out (repeatable)")
    args = p.parse_args(argv)
    print("\n".join(requirements(args.pyproject, args.extra, args.without)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
