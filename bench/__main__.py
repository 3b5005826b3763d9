"""Every benchmark in one run: `python -m bench` prints the tables and writes JSON under bench/results/.

1. reply generation at matched precision: ours int4 vs llama.cpp on a Q4_0 requantization of the bundled GGUF,
   int8 vs Q8_0, and llama.cpp on the file as shipped; alternating fresh processes, medians of 3 rounds
   (llama-cpp-python is built once from PyPI source and cached; a benchmark peer only);
2. the app: first start with empty caches, later start, a 40-turn chat with 3 photos and 2 voice turns
   (memory after each kind of session, peak RSS), time to first token at turn 2 vs turn 40.
The speech and vision encoders have their own scripts (bench_speech, bench_vision).
"""

import os
import sys

from bench import bench_app, bench_generation


def main() -> None:
    print("## Reply generation at matched precision vs llama.cpp (64 new tokens, greedy, same prompt tokens)\n",
          flush=True)
    bench_generation.main(["--threads", str(os.cpu_count())])
    print("\n## The app\n", flush=True)
    bench_app.main(sys.argv[1:])


if __name__ == "__main__":
    main()
