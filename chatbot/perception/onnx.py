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


def session(model: str | os.PathLike, threads: int = 1, *, give_back_memory: bool = False):
    """A CPU inference session for `model` on `threads` cores, quiet in the log.

    give_back_memory: for models whose working memory is large and used rarely (OCR on a photo): the
    session's memory arena is shrunk after each run instead of being kept at its largest.
    """
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    made = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    return _ShrinkingSession(made) if give_back_memory else made


class _ShrinkingSession:
    """An InferenceSession whose runs end by giving the memory arena's free blocks back.

    Measured on RapidOCR's text detector (a 736×1120 input): peak +135 MB and +50 MB kept after the run,
    against peak +230-330 MB without an arena (RapidOCR's own setting) and +135 MB kept with a plain arena.
    """

    def __init__(self, session) -> None:
        self._session = session
        self._options = onnxruntime().RunOptions()
        self._options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, output_names, input_feed, run_options=None):
        return self._session.run(output_names, input_feed, run_options or self._options)

    def __getattr__(self, name: str):
        return getattr(self._session, name)
