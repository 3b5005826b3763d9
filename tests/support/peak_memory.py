"""How much a loader's peak memory rises on hostile files, measured in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_MEASURE = """
import json, resource, sys
from chatbot.errors import UserFacingError

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

load(sys.argv[1])  # warm up on a normal file: imports, decoders, allocators
base, growth = peak_mb(), {}
for path in sys.argv[2:]:
    try:
        load(path)
    except UserFacingError:
        pass
    growth[path] = peak_mb() - base
print(json.dumps(growth))
"""


def peak_rss_growth_mb(loader: str, normal: Path, files: list[Path], timeout: int = 300) -> dict[str, float]:
    """MB by which the peak RSS of a fresh process rose above loading `normal`, for each of `files`.

    `loader` is Python source defining `load(path)`; refusals (UserFacingError) are expected.
    """
    script = textwrap.dedent(loader) + _MEASURE
    out = subprocess.run([sys.executable, "-c", script, str(normal), *map(str, files)], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout, check=True).stdout
    return json.loads(out.splitlines()[-1])
