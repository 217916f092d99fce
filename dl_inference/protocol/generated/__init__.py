"""Python code generated from protos/*.proto by scripts/gen_protos.py.

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
