"""Converted Caffe models, cached by the content of their files.

A version directory holding ``<x>.prototxt`` + ``<y>.caffemodel`` is converted to ONNX once; the
result is stored under ``$DL_INFERENCE_CACHE_DIR/caffe`` (default ``~/.cache/dl_inference/caffe``,
never inside the model repository, which may be read-only) with a key made of both files' SHA-256,
the pre-processing settings and the converter version. Changed files give a new key, so the model
is rebuilt. Several workers loading the same model at once convert it once (a file lock).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from dl_inference.convert.caffe.preprocess import Preprocess, apply_preprocess
from dl_inference.convert.filecache import atomic_write_bytes, cache_root, file_lock
from dl_inference.errors import InvalidArgument

log = logging.getLogger(__name__)

CONVERTER_VERSION = "1"


def find_caffe_files(version_dir: Path) -> tuple[Path, Path] | None:
    """The (prototxt, caffemodel) pair of a version directory; None if it holds no Caffe model."""
    protos = sorted(version_dir.glob("*.prototxt"))
    weights = sorted(version_dir.glob("*.caffemodel"))
    if not protos and not weights:
        return None
    if len(protos) != 1 or len(weights) != 1:
        raise InvalidArgument(
            f"{version_dir} must hold exactly one .prototxt and one .caffemodel for a Caffe model, "
            f"found {[p.name for p in protos]} and {[w.name for w in weights]}"
        )
    return protos[0], weights[0]


def _digest(*paths: Path, extra: str) -> str:
    h = hashlib.sha256()
    h.update(f"dl_inference caffe converter {CONVERTER_VERSION}\n{extra}\n".encode())
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:32]


def converted_model(prototxt: Path, caffemodel: Path, pre: Preprocess) -> Path:
    """Path of the ONNX file for this Caffe model, converting it first if the cache lacks it."""
    from dl_inference.convert.caffe.loader import load_net
    from dl_inference.convert.caffe.to_onnx import convert_net

    target = cache_root("caffe") / f"{_digest(prototxt, caffemodel, extra=repr(pre))}.onnx"
    if target.exists():
        log.info("Caffe model %s: using cached conversion %s", prototxt.name, target)
        return target
    with file_lock(target.with_suffix(".lock")):
        if target.exists():  # another worker converted it while we waited
            return target
        size_mb = caffemodel.stat().st_size / 1e6
        log.info("converting Caffe model %s + %s (%.1f MB) to ONNX ...", prototxt.name, caffemodel.name, size_mb)
        start = time.monotonic()
        model = apply_preprocess(convert_net(load_net(prototxt, caffemodel)), pre)
        atomic_write_bytes(target, model.SerializeToString())  # readable by workers running as another user
        log.info("converted %s in %.2f s -> %s", prototxt.name, time.monotonic() - start, target)
    return target
