"""ppo and ppo-oracle one after the other (`pipeline run --jobs 1`) against side by side (`--jobs 2`, the default on
the CPU: a thread each on 2 cores), from the SFT policy and reward model of a finished run (`make demo`'s
outputs/tiny by default). The two settings are interleaved, `--runs` times each; the table gives the median and
min-max wall time of the runner (`wall_seconds_total`: its own start, both stages, no evaluation), the ratio of the
medians (measured side by side in one run), and each stage's gold score: the same work either way (the scores
can differ in the last digits: a thread's float sums are grouped differently from two threads').

    python bench/jobs.py [--run outputs/tiny] [--runs 2] [--md bench/results/jobs.md] [--json bench/results/jobs.json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("ppo", "ppo-oracle")
JOBS = (1, 2)
# --quick: a few updates of short answers (tests/test_bench.py, on the tiny models of its test run)
QUICK = ["--total_episodes", "64", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
         "--response_length", "16", "--eval_max_prompts", "8", "--eval_samples_per_prompt", "1"]


def write_recipes(run: Path, dest: Path) -> Path:
    """recipes/tiny's ppo and ppo-oracle recipes, reading the SFT policy and reward model of `run`, writing
    under `dest`."""
    (dest / "recipes").mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        recipe = yaml.safe_load((ROOT / "recipes" / "tiny" / f"{stage}.yaml").read_text())
        recipe.update(sft_model_path=str(run / "sft"), reward_model_path=str(run / "reward"),
                      output_dir=str(dest / "outputs" / stage), report_to="none", disable_tqdm=True)
        (dest / "recipes" / f"{stage}.yaml").write_text(yaml.safe_dump(recipe))
    return dest / "recipes"


def run_once(run: Path, jobs: int, work: Path, extra: list[str]) -> dict:
    recipes = write_recipes(run, work)
    subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipes), "--stages", ",".join(STAGES),
                    "--skip_eval", "--jobs", str(jobs), *(["--", *extra] if extra else [])],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = json.loads((work / "outputs" / "results.json").read_text())
    return {"wall_seconds_total": results["wall_seconds_total"],
            **{f"{stage}_wall_seconds": results[stage]["wall_seconds"] for stage in STAGES},
            **{f"{stage}_gold_score": results[stage]["gold_score_ppo"] for stage in STAGES}}


def measure(run: Path, runs: int, extra: list[str]) -> dict:
    out = {str(jobs): [] for jobs in JOBS}
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(runs):
            for jobs in JOBS:
                out[str(jobs)].append(run_once(run, jobs, Path(work, f"jobs{jobs}-{repeat}"), extra))
    return out


def markdown(out: dict, runs: int, run: Path, quick: bool) -> str:
    wall = {jobs: [r["wall_seconds_total"] for r in results] for jobs, results in out.items()}
    base = statistics.median(wall["1"])
    lines = ["# ppo and ppo-oracle: one after the other, or side by side (CPU)", "",
             f"`python bench/jobs.py --run {run} --runs {runs}`{' --quick' if quick else ''}: `pipeline run "
             f"--stages ppo,ppo-oracle --skip_eval` from `{run}`'s SFT policy and reward model with `--jobs 1` (one "
             f"after the other, torch's {_threads()} threads each) and `--jobs 2` (side by side, the threads split "
             f"between them), interleaved, {runs} runs each; {os.cpu_count()} cores, Python "
             f"{platform.python_version()}. The wall time is the runner's from its start to its end; the ratio is "
             "of the medians of this run.", "",
             "| --jobs | wall s median | min-max | ratio to --jobs 1 | ppo wall s | ppo-oracle wall s | "
             "ppo gold score | ppo-oracle gold score |",
             "|---|---|---|---|---|---|---|---|"]
    for jobs, results in out.items():
        median = statistics.median(wall[jobs])
        stage_walls = [" / ".join(f"{r[f'{stage}_wall_seconds']:.0f}" for r in results) for stage in STAGES]
        scores = [" / ".join(f"{r[f'{stage}_gold_score']:.3f}" for r in results) for stage in STAGES]
        lines.append(f"| {jobs} | {median:.1f} | {min(wall[jobs]):.1f}-{max(wall[jobs]):.1f} | {median / base:.2f} | "
                     f"{' | '.join(stage_walls)} | {' | '.join(scores)} |")
    return "\n".join(lines) + "\n"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="outputs/tiny", help="a finished run's folder, with sft/ and reward/")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: one run each of a few short updates")
    parser.add_argument("--md", default=str(ROOT / "bench" / "results" / "jobs.md"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "jobs.json"))
    args = parser.parse_args()
    run = Path(args.run)
    missing = [part for part in ("sft", "reward") if not (ROOT / run / part / "config.json").exists()]
    if missing:
        raise SystemExit(f"error: {run} has no {' or '.join(missing)} model: run `make demo` first, or give --run")
    runs = 1 if args.quick else args.runs
    out = measure((ROOT / run).resolve(), runs, QUICK if args.quick else [])
    Path(args.json).write_text(json.dumps({"runs": runs, "run": str(run), "quick": args.quick, "results": out},
                                          indent=2))
    Path(args.md).write_text(markdown(out, runs, run, args.quick))
    print(Path(args.md).read_text())


if __name__ == "__main__":
    main()
