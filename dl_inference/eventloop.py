"""Run a coroutine on uvloop when it is installed (it is, on Linux), else on asyncio's loop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``DL_INFERENCE_LOOP=asyncio`` forces the standard loop (for comparisons and debugging)."""
    try:
        if os.environ.get("DL_INFERENCE_LOOP") == "asyncio":
            raise ImportError
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
