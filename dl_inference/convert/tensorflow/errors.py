"""The converter's own errors; each is a :class:`~dl_inference.errors.ServerError` with a clear message."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dl_inference.errors import Code, ServerError

if TYPE_CHECKING:
    from dl_inference.convert.tensorflow.parity import ParityReport

__all__ = ["ConversionFailed", "ParityMismatch", "TensorFlowUnavailable"]


class TensorFlowUnavailable(ServerError):
    """TensorFlow or tf2onnx cannot be imported in this environment."""

    code = Code.FAILED_PRECONDITION


class ConversionFailed(ServerError):
    """tf2onnx could not convert the graph, or its result is not a valid, runnable ONNX model."""

    code = Code.INTERNAL


class ParityMismatch(ServerError):
    """The ONNX model's outputs differ from TensorFlow's beyond the tolerance.

    ``kept`` is where the rejected ONNX file was left for inspection (None if it was not written)."""

    code = Code.FAILED_PRECONDITION

    def __init__(self, message: str, report: ParityReport, kept: Path | None = None) -> None:
        super().__init__(message)
        self.report = report
        self.kept = kept
