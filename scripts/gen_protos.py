#!/usr/bin/env python3
"""Generate the Python protobuf / gRPC code for the V2 inference protocol.

Usage (from anywhere; paths are resolved relative to the repository root):

    python scripts/gen_protos.py          # (re)generate dl_inference/protocol/generated/
    python scripts/gen_protos.py --check  # exit 1 if the checked-in code is stale

Runs ``python -m grpc_tools.protoc -I protos --python_out --pyi_out
--grpc_python_out`` over every ``protos/*.proto`` and then rewrites the
top-level imports protoc emits between our own modules (``import
model_config_pb2 as ...``) into package-relative ones (``from . import
model_config_pb2 as ...``) so that ``dl_inference.protocol.generated`` imports
cleanly without touching ``sys.path``.

The output depends only on the .proto sources and the grpcio-tools version
(pinned in pyproject.toml), so running the script twice yields identical files.
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "dl_inference" / "protocol" / "generated"

# The generated package's __init__.py. Besides the docstring it carries the one piece of code that lets
# these modules load under an old protobuf runtime (see the comment inside); it is written by this script
# like the rest, so nothing here is edited by hand.
INIT_TEXT = '''"""Python code generated from protos/*.proto by scripts/gen_protos.py.

Do not edit these files by hand: change the .proto sources and rerun
``python scripts/gen_protos.py`` (``--check`` verifies they are up to date).
"""

try:
    from google.protobuf import runtime_version as _runtime_version
except ImportError:
    # The *_pb2 modules are protobuf 6.x gencode; they import google.protobuf.runtime_version (new in
    # protobuf 5.26) only to check that the runtime is not older than the gencode. Worker environments
    # pinned to an older protobuf (the Intel Extension for TensorFlow one: TensorFlow 2.15, protobuf<4.24)
    # load these descriptors fine, so there a stand-in that accepts them takes its place. Where the real
    # module exists (protobuf >= 5.26) this does nothing.
    import enum as _enum
    import sys as _sys
    import types as _types

    import google.protobuf as _protobuf

    class _Domain(_enum.Enum):
        GOOGLE_INTERNAL = 1
        PUBLIC = 2

    def _accept_gencode(domain: object, major: int, minor: int, patch: int, suffix: str, location: str) -> None:
        """Stand-in for protobuf's check: an old runtime that lacks it is accepted."""

    _runtime_version = _types.ModuleType("google.protobuf.runtime_version", "dl_inference stand-in (old protobuf)")
    _runtime_version.Domain = _Domain  # type: ignore[attr-defined]
    _runtime_version.ValidateProtobufRuntimeVersion = _accept_gencode  # type: ignore[attr-defined]
    _sys.modules[_runtime_version.__name__] = _runtime_version
    _protobuf.runtime_version = _runtime_version  # type: ignore[attr-defined]
'''

# Suffixes of the files protoc writes for each .proto.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _proto_files() -> list[str]:
    protos = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    if not protos:
        sys.exit(f"gen_protos: no .proto files found in {PROTO_DIR}")
    return protos


def _run_protoc(protos: list[str], out: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        str(PROTO_DIR.relative_to(ROOT)),
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    except OSError as exc:  # pragma: no cover - interpreter vanished
        sys.exit(f"gen_protos: cannot run protoc: {exc}")
    if proc.returncode != 0:
        msg = proc.stderr.strip() or proc.stdout.strip()
        if "No module named grpc_tools" in msg:
            msg += "\n(install the test extras: pip install 'grpcio-tools==1.81.1')"
        sys.exit(f"gen_protos: protoc failed (exit {proc.returncode}):\n{msg}")


def _relativize_imports(text: str, modules: set[str]) -> str:
    """Turn protoc's absolute imports of sibling generated modules into relative ones."""
    names = "|".join(sorted(map(re.escape, modules)))
    # `import model_config_pb2 as model__config__pb2`
    text = re.sub(rf"^import ({names})( as \w+)?$", r"from . import \1\2", text, flags=re.M)
    # `from model_config_pb2 import X as _X` (emitted in .pyi files)
    text = re.sub(rf"^from ({names}) import ", r"from .\1 import ", text, flags=re.M)
    return text


def generate(dest: Path) -> dict[str, str]:
    """Generate all files into ``dest`` (which must be empty); return {name: text}."""
    protos = _proto_files()
    _run_protoc(protos, dest)
    stems = [Path(p).stem for p in protos]
    modules = {f"{s}_pb2" for s in stems} | {f"{s}_pb2_grpc" for s in stems}
    files: dict[str, str] = {"__init__.py": INIT_TEXT}
    for path in sorted(dest.iterdir()):
        if not path.name.endswith(GENERATED_SUFFIXES):
            continue
        files[path.name] = _relativize_imports(path.read_text(encoding="utf-8"), modules)
    return files


def _existing_files(directory: Path) -> dict[str, str]:
    if not directory.is_dir():
        return {}
    return {
        p.name: p.read_text(encoding="utf-8")
        for p in sorted(directory.iterdir())
        if p.is_file() and (p.name == "__init__.py" or p.name.endswith(GENERATED_SUFFIXES))
    }


def check(expected: dict[str, str]) -> int:
    actual = _existing_files(OUT_DIR)
    rel = OUT_DIR.relative_to(ROOT)
    problems: list[str] = []
    for name in sorted(expected.keys() - actual.keys()):
        problems.append(f"missing: {rel / name}")
    for name in sorted(actual.keys() - expected.keys()):
        problems.append(f"not produced by the generator (stale?): {rel / name}")
    for name in sorted(expected.keys() & actual.keys()):
        if expected[name] != actual[name]:
            diff = difflib.unified_diff(
                actual[name].splitlines(),
                expected[name].splitlines(),
                f"{rel / name} (checked in)",
                f"{rel / name} (regenerated)",
                n=1,
                lineterm="",
            )
            excerpt = "\n".join(list(diff)[:20])
            problems.append(f"out of date: {rel / name}\n{excerpt}")
    if problems:
        print(
            "gen_protos --check: generated protobuf code is stale; "
            "run `python scripts/gen_protos.py` and commit the result.",
            file=sys.stderr,
        )
        for p in problems:
            print("  " + p.replace("\n", "\n    "), file=sys.stderr)
        return 1
    print(f"gen_protos --check: {rel} is up to date ({len(expected)} files).")
    return 0


def write(files: dict[str, str]) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    # Drop generated files whose .proto no longer exists.
    for name in _existing_files(OUT_DIR).keys() - files.keys():
        (OUT_DIR / name).unlink()
    for name, text in files.items():
        target = OUT_DIR / name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8", newline="\n")
    print(f"gen_protos: wrote {len(files)} files to {OUT_DIR.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and fail if the checked-in files differ",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gen_protos_") as tmp:
        files = generate(Path(tmp))
    if args.check:
        return check(files)
    write(files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
