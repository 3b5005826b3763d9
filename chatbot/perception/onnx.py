"""The one way this app gets onnxruntime: imported with its telemetry turned off.

onnxruntime reports usage events by default (DNS lookups of
mobile.events.data.microsoft.com were seen when a session was created); this app
never calls out. Every module that creates an ONNX session (directly or through a
library such as RapidOCR) calls `onnxruntime()` first.
"""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def onnxruntime() -> ModuleType:
    import onnxruntime as ort

    ort.disable_telemetry_events()  # process-wide, and must precede the first InferenceSession
    return ort
