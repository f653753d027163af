"""TRL's tiled LM head against the whole logits (`lm_head: tiled` vs `lm_head: auto`, pipeline/lm_head.py) in the
tiny pretraining stage on this machine's CPU: the same recipe, `--steps` optimizer steps, the two settings
interleaved, `--runs` times each. The table gives the median and min-max training steps per second, the ratio of
the medians (measured side by side in one run), and the training and held-out losses: the two compute the same
loss to float rounding, and the rounding differences grow over the steps into small differences of the losses.

    python bench/lm_head.py [--runs 3] [--steps 400] [--md bench/results/lm_head.md] [--json bench/results/lm_head.json]
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

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "recipes/tiny/pretrain.yaml"
SETTINGS = ("tiled", "auto")


def run_once(setting: str, steps: int, output_dir: str) -> dict:
    subprocess.run([sys.executable, "scripts/pretrain.py", "--config", RECIPE, "--max_steps", str(steps),
                    "--lm_head", setting, "--output_dir", output_dir, "--save_strategy", "no", "--report_to", "none",
                    "--logging_steps", str(steps)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = json.loads(Path(output_dir, "trainer_state.json").read_text())["log_history"]
    summary = next(entry for entry in history if "train_runtime" in entry)
    results = json.loads(Path(output_dir, "results.json").read_text())
    return {"steps_per_s": steps / summary["train_runtime"], "train_loss": results["train_loss"],
            "eval_loss": results.get("eval_loss")}


def measure(runs: int, steps: int) -> dict:
    out = {setting: [] for setting in SETTINGS}
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(runs):
            for setting in SETTINGS:
                out[setting].append(run_once(setting, steps, os.path.join(work, f"{setting}-{repeat}")))
    return out


def markdown(runs_out: dict, runs: int, steps: int) -> str:
    speed = {setting: [r["steps_per_s"] for r in results] for setting, results in runs_out.items()}
    base = statistics.median(speed["tiled"])
    lines = ["# TRL's tiled LM head against the whole logits (pretrain, CPU)", "",
             f"`python bench/lm_head.py --runs {runs} --steps {steps}`: `{RECIPE}` for {steps} steps with `lm_head: "
             f"tiled` and `lm_head: auto`, interleaved, {runs} runs each; {os.cpu_count()} cores, Python "
             f"{platform.python_version()}. The ratio is of the medians of this run. The two compute the same loss "
             "to float rounding; over the steps the rounding differences grow into the small differences of the "
             "losses below.", "",
             "| lm_head | steps/s median | min-max | ratio to tiled | train loss | held-out loss |",
             "|---|---|---|---|---|---|"]
    for setting, results in runs_out.items():
        median = statistics.median(speed[setting])
        losses = " / ".join(f"{r['train_loss']:.4f}" for r in results)
        held_out = " / ".join(f"{r['eval_loss']:.4f}" for r in results if r["eval_loss"] is not None)
        lines.append(f"| `{setting}` | {median:.1f} | {min(speed[setting]):.1f}-{max(speed[setting]):.1f} | "
                     f"{median / base:.2f} | {losses} | {held_out} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="a smoke run: one run of 5 steps each "
                        "(tests/test_bench.py)")
    parser.add_argument("--md", default=str(ROOT / "bench" / "results" / "lm_head.md"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "lm_head.json"))
    args = parser.parse_args()
    runs, steps = (1, 5) if args.quick else (args.runs, args.steps)
    out = measure(runs, steps)
    Path(args.json).write_text(json.dumps({"runs": runs, "steps": steps, "results": out}, indent=2))
    Path(args.md).write_text(markdown(out, runs, steps))
    print(Path(args.md).read_text())


if __name__ == "__main__":
    main()
