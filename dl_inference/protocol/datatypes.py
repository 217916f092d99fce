"""V2 datatype names, model-config ``TYPE_*`` names and numpy dtypes, and conversions between them."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from dl_inference.errors import InvalidArgument

BF16 = np.dtype(ml_dtypes.bfloat16)

# V2 name -> numpy dtype. BYTES is an object array of ``bytes``.
_V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": BF16,
    "BYTES": np.dtype(np.object_),
}
V2_DATATYPES: tuple[str, ...] = tuple(_V2_TO_NUMPY)

# Model-config enum names (Triton's DataType) <-> V2 names. TYPE_STRING is BYTES.
_CONFIG_TO_V2: dict[str, str] = {f"TYPE_{k}": k for k in V2_DATATYPES if k != "BYTES"}
_CONFIG_TO_V2["TYPE_STRING"] = "BYTES"
_V2_TO_CONFIG: dict[str, str] = {v: k for k, v in _CONFIG_TO_V2.items()}


def numpy_dtype(datatype: str) -> np.dtype:
    """numpy dtype for a V2 datatype name; InvalidArgument for an unknown name."""
    try:
        return _V2_TO_NUMPY[datatype]
    except KeyError:
        raise InvalidArgument(f"unknown datatype '{datatype}', expected one of {', '.join(V2_DATATYPES)}") from None


def datatype_of(dtype: np.dtype) -> str:
    """V2 datatype name for a numpy dtype (str/bytes/object arrays are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype == BF16:
        return "BF16"
    if dtype.kind in "OSU":
        return "BYTES"
    for name, candidate in _V2_TO_NUMPY.items():
        if candidate == dtype:
            return name
    raise InvalidArgument(f"numpy dtype {dtype} has no V2 datatype")


def element_size(datatype: str) -> int | None:
    """Bytes per element on the wire; None for BYTES (variable length)."""
    if datatype == "BYTES":
        return None
    return numpy_dtype(datatype).itemsize


def config_to_v2(config_type: str) -> str:
    """``TYPE_FP32`` -> ``FP32``; ``TYPE_STRING`` -> ``BYTES``."""
    try:
        return _CONFIG_TO_V2[config_type]
    except KeyError:
        raise InvalidArgument(f"unknown model-config data type '{config_type}'") from None


def v2_to_config(datatype: str) -> str:
    """``FP32`` -> ``TYPE_FP32``; ``BYTES`` -> ``TYPE_STRING``."""
    try:
        return _V2_TO_CONFIG[datatype]
    except KeyError:
        raise InvalidArgument(f"unknown datatype '{datatype}'") from None
