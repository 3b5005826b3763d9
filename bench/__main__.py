"""Every benchmark in one run: `python -m bench` prints the tables and writes JSON under bench/results/.

1. reply generation: transformers fp32 and each quantize mode vs llama.cpp on the same GGUF model
   (llama-cpp-python is built once from PyPI source and cached; a benchmark peer only);
2. the app: cold start, photo and voice turns, peak RSS, time to first token at turn 2 vs turn 40.
The speech and vision encoders have their own scripts (bench_speech, bench_vision).
"""

import os
import sys

from bench import bench_app, bench_generation


def main() -> None:
    print("## Reply generation vs llama.cpp (64 new tokens, greedy, same prompt tokens)\n", flush=True)
    bench_generation.main(["--threads", str(os.cpu_count())])
    print("\n## The app\n", flush=True)
    bench_app.main(sys.argv[1:])


if __name__ == "__main__":
    main()
