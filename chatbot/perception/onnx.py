"""The one way this app gets onnxruntime: imported with its telemetry turned off.

onnxruntime (1.29+) uploads usage events from Linux too: lookups of
mobile.events.data.microsoft.com were seen after the first ONNX session, repeated
during a run, even after `disable_telemetry_events()`. Only ORT_DISABLE_TELEMETRY=1,
set before onnxruntime initialises, stops its uploader. Every module that creates an
ONNX session (directly or through a library such as RapidOCR) calls `onnxruntime()` first.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1"}


@functools.cache
def onnxruntime() -> ModuleType:
    os.environ.update(TELEMETRY_OFF)  # read once, when onnxruntime sets up its environment
    import onnxruntime as ort

    ort.disable_telemetry_events()  # also silences the Windows (ETW) provider
    return ort


def session(model: str | os.PathLike, threads: int = 1):
    """A CPU inference session for `model` on `threads` cores, quiet in the log."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    return ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
