"""Start-up time of the command line: `python -m pipeline --help` and `ls` (which import neither torch nor TRL), a
stage's `--help` (which imports them), and a bare `import torch, transformers, trl` as the eager-import baseline.
Each command runs in a fresh process, the commands interleaved, `--runs` times; the table gives the median and
the min-max of the wall time, and each command's ratio to the baseline measured in the same run.

    python bench/startup.py [--runs 7] [--md bench/results/startup.md] [--json bench/results/startup.json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "import torch, transformers, trl"
COMMANDS = {
    "python -m pipeline --help": ["-m", "pipeline", "--help"],
    "python -m pipeline ls": ["-m", "pipeline", "ls"],
    "python scripts/sft.py --help": ["scripts/sft.py", "--help"],
    BASELINE: ["-c", BASELINE],
}
TARGET_SECONDS = 1.5  # issue 13: --help and ls


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(runs: int, commands: dict, warm_up: bool = True) -> dict:
    if warm_up:
        for args in commands.values():  # once each first: the files in the page cache, as for a user's second command
            timed(args)
    seconds = {name: [] for name in commands}
    for _ in range(runs):
        for name, args in commands.items():
            seconds[name].append(timed(args))
    return seconds


def markdown(seconds: dict, runs: int) -> str:
    baseline = statistics.median(seconds[BASELINE]) if BASELINE in seconds else None
    lines = ["# Start-up time of the command line", "",
             f"`python bench/startup.py --runs {runs}`: each command in a fresh process, interleaved, {runs} runs "
             f"(after one warm-up run each); {os.cpu_count()} cores, Python {platform.python_version()}. The ratio "
             "is to the eager-import baseline of the same run.", "",
             "| command | median s | min-max s | ratio to baseline | target |", "|---|---|---|---|---|"]
    for name, values in seconds.items():
        median = statistics.median(values)
        target = (f"< {TARGET_SECONDS} s: {'met' if median < TARGET_SECONDS else 'not met'}"
                  if name.startswith("python -m pipeline") else "")
        ratio = f"{median / baseline:.2f}" if baseline else "not measured"
        lines.append(f"| `{name}` | {median:.2f} | {min(values):.2f}-{max(values):.2f} | {ratio} | {target} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a smoke run: one run of the two fast commands, no "
                        "warm-up (tests/test_bench.py)")
    parser.add_argument("--md", default=str(ROOT / "bench" / "results" / "startup.md"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "startup.json"))
    args = parser.parse_args()
    commands = {k: v for k, v in COMMANDS.items() if k.startswith("python -m pipeline")} if args.quick else COMMANDS
    runs = 1 if args.quick else args.runs
    seconds = measure(runs, commands, warm_up=not args.quick)
    Path(args.json).write_text(json.dumps({"runs": runs, "seconds": seconds}, indent=2))
    Path(args.md).write_text(markdown(seconds, runs))
    print(Path(args.md).read_text())


if __name__ == "__main__":
    main()
