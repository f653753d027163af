"""`make bench`, GRPO and RLOO: the stage's generation and log-probability passes against TRL 1.16's own.

    python bench/group.py              # the demo's grpo.yaml and rloo.yaml, 3 seeds per setting, interleaved
    python bench/group.py --quick      # a smoke run: grpo alone, 1 seed, 4 steps, 4 held-out prompts

Both settings run the pipeline's stage (`pipeline.stages.run(stage, ["--config", recipe, ...])`, what
`scripts/grpo.py` runs) from the demo's SFT policy and reward model (`--models`, default `outputs/tiny`: run
`make demo` first), and differ only in the two methods of TRL's trainer the stage replaces: how the answers are
sampled (`_generate_single_turn`) and how their log-probabilities are computed (the old policy's, the reference's
and the trained policy's, `_get_per_token_logps_and_entropies`):

* *TRL 1.16*: TRL's own methods (the stage's overrides taken off the trainer class, in the run's process alone)
  with TRL's tiled LM head (`lm_head: tiled`): transformers' `generate`; prompt + answer rows as padded, at
  positions counted from each row's first pad, where generation counted them from its first real token;
* *ours*: the stage as shipped (`padding_free: auto`, `lm_head: auto`): pipeline.sampler draws the answers (the
  same distribution); each token at its own position, only real tokens computed where the layout packs, and on the
  CPU small logits whole, at the positions that have a label.

Measured per run: seconds of the `train()` call, of generation and of the log-probability passes in it (without
and with gradients; the backward pass is not in them), the share of the tokens those passes computed that were
padding,
and the stage's own evaluation against the SFT policy on held-out prompts (gold score, gold win rate, repeated
sentences). Each run is its own process, after waiting for a quiet machine (bench/ppo_vs_trl112.py's `Gate`).
Writes bench/results/group.md and group.json.
"""

import argparse
import collections
import datetime
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import ppo_vs_trl112 as base  # noqa: E402
from bench.run import machine  # noqa: E402

SETTINGS = ("trl", "ours")
NAMES = {"trl": "TRL 1.16", "ours": "ours"}
QUALITY = ("gold_score", "gold_win_rate_vs_sft", "repeat_rate", "kl_to_sft")


# ------------------------------------------------------------------------------------------------ one run

def worker(spec: dict) -> None:
    """One stage run in this process (see the module's docstring), its figures written to `spec["result_file"]`:
    the stage's recipe with `spec["argv"]` after it."""
    import torch

    from pipeline import padding_free, stages
    from pipeline.stages import group

    timers, tokens = collections.defaultdict(float), collections.Counter()
    original = group.monitored

    def monitored(trainer_class):
        cls = original(trainer_class)
        ours = cls._get_per_token_logps_and_entropies
        scoring = ours if setting == "ours" else trainer_class._get_per_token_logps_and_entropies

        def timed(self, model, input_ids, attention_mask, *args, **kwargs):
            start = time.perf_counter()
            result = scoring(self, model, input_ids, attention_mask, *args, **kwargs)
            timers["log_probs_grad_s" if torch.is_grad_enabled() else "log_probs_no_grad_s"] += \
                time.perf_counter() - start
            tokens["real"] += int(attention_mask.sum())
            tokens["computed"] += (attention_mask.numel() if setting == "trl" else
                                   padding_free.layout(input_ids, attention_mask.bool(), self.layout).computed_tokens)
            return result

        cls._get_per_token_logps_and_entropies = timed
        generation = cls._generate_single_turn if setting == "ours" else trainer_class._generate_single_turn
        cls._generate_single_turn = seconds_into("generation_s", generation)
        cls.train = seconds_into("train_s", cls.train)
        return cls

    def seconds_into(key, method):
        def timed_method(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                timers[key] += time.perf_counter() - start
        return timed_method

    group.monitored = monitored
    stage, setting, out = spec["stage"], spec["setting"], spec["out"]
    argv = ["--config", os.path.join(ROOT, "recipes", "tiny", f"{stage}.yaml"), *spec["argv"], "--output_dir", out,
            "--seed", str(spec["seed"]), "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--lm_head", "tiled" if setting == "trl" else "auto"]
    started = time.perf_counter()
    stages.run(stage, argv)
    results = json.load(open(os.path.join(out, "results.json")))
    quality = {key: results.get(f"{key}_{stage}", results.get(key)) for key in QUALITY}  # no gold off the embedded task
    with open(spec["result_file"], "w") as f:
        json.dump({"stage": stage, "setting": setting, "seed": spec["seed"], **timers, "tokens": dict(tokens),
                   "padding_fraction": 1 - tokens["real"] / tokens["computed"], "process_s": time.perf_counter()
                   - started, **quality}, f, indent=2)


def run_one(gate, stage: str, setting: str, seed: int, argv: list, work: str) -> dict:
    name = f"{stage}-{setting}-{seed}"
    result = base.run_worker(gate, __file__, name, {"stage": stage, "setting": setting, "seed": seed, "argv": argv,
                                                    "out": os.path.join(work, name)}, work)
    gold = "" if result["gold_score"] is None else f", gold {result['gold_score']:.2f}"
    base.say(f"{name}: train {result['train_s']:.2f} s{gold}, padding {result['padding_fraction']:.3f}, other load "
             f"{result['other_load_cores']:.2f}")
    return result


# ---------------------------------------------------------------------------------------------- the table

def summarise(runs: list, info: dict) -> dict:
    out = dict(info, stages={})
    for stage in sorted({r["stage"] for r in runs}):
        rows = {}
        for setting in SETTINGS:
            mine = sorted((r for r in runs if r["stage"] == stage and r["setting"] == setting), key=lambda r: r["seed"])
            rows[setting] = {key: base.stat([r[key] for r in mine]) for key in (
                "train_s", "generation_s", "log_probs_no_grad_s", "log_probs_grad_s", "padding_fraction", *QUALITY,
                "other_load_cores") if all(r.get(key) is not None for r in mine)}
        pairs = [(o, t) for o in runs for t in runs if o["stage"] == t["stage"] == stage and o["seed"] == t["seed"]
                 and o["setting"] == "ours" and t["setting"] == "trl"]
        speed = [t["train_s"] / o["train_s"] for o, t in pairs]  # ours' steps/s over TRL's: the same steps
        passes = [(t["log_probs_no_grad_s"] + t["log_probs_grad_s"]) / (o["log_probs_no_grad_s"] + o["log_probs_grad_s"])
                  for o, t in pairs]
        out["stages"][stage] = {"rows": rows, "train_speed_ratio": base.stat(speed),
                                "log_prob_speed_ratio": base.stat(passes)}
    out["runs"] = runs
    return out


def _f(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1 else f"{x:.2f}"


def _cell(st: dict) -> str:
    return _f(st["median"]) if st["min"] == st["max"] else f"{_f(st['median'])} ({_f(st['min'])}–{_f(st['max'])})"


SHAPES = {"tiny": "the demo's recipes (`recipes/tiny/{stage}.yaml`) from the demo's models",
          "long": "hh-rlhf's shapes: bench/ppo_long.py's random GPT-2 models (6 layers x 512, an 8192-token "
                  "vocabulary) and long-tailed prompts (16-380 tokens), answers of up to 128 tokens, the tiny "
                  "recipe's batch (64 answers, 8 per prompt) for a few steps; speed only"}
ROWS = (("train_s", "train() s"), ("generation_s", "generation s"),
        ("log_probs_no_grad_s", "log-prob passes without gradients s"),
        ("log_probs_grad_s", "log-prob passes with gradients s"),
        ("padding_fraction", "padding (share of computed tokens)"),
        ("gold_score", "gold score (held-out)"), ("gold_win_rate_vs_sft", "gold win rate vs SFT"),
        ("repeat_rate", "answers repeating a sentence"), ("kl_to_sft", "KL to SFT (per answer)"),
        ("other_load_cores", "other processes' CPU use (cores)"))


def markdown(results: dict) -> str:
    lines = ["# Benchmarks: GRPO and RLOO generation and log-probabilities", "",
             "Generated by `python bench/group.py` (`--long`: the long section); raw figures in "
             "[`group.json`](group.json). Do not edit by hand: rerun.", "",
             "The pipeline's GRPO and RLOO stages with TRL 1.16's own generation and log-probability passes "
             "(*TRL 1.16*: its `_generate_single_turn` through transformers' `generate`, its "
             "`_get_per_token_logps_and_entropies` and tiled LM head) and as shipped (*ours*: the sampler, "
             "`padding_free: auto`, `lm_head: auto`), from the same SFT policy and reward model, each run its own "
             "process, interleaved. A cell is the median over the seeds (min–max); a ratio is the median of the "
             "per-seed ratios (TRL's seconds over ours: above 1, ours is faster). *log-prob passes*: the old "
             "policy's, the reference's and the trained policy's forward passes (not their backward). *padding*: "
             "the share of the tokens those passes computed that were padding. Quality: the stage's own evaluation "
             "against the SFT policy on held-out prompts, judged by the embedded task's oracle.", ""]
    for shape, summary in results.items():
        lines += [f"## {shape}: {SHAPES[shape]}", "",
                  f"{'A quick (smoke) run, ' if summary['quick'] else ''}{summary['date']}, {summary['wall_s']:.0f} s; "
                  f"models `{summary['models']}`, seeds {', '.join(map(str, summary['seeds']))}"
                  + (f", max_steps {summary['steps']}" if summary.get("steps") else "") + ".", ""]
        for stage, data in summary["stages"].items():
            rows = data["rows"]
            lines += [f"### {stage.upper()}", "",
                      f"train(): **{_cell(data['train_speed_ratio'])}×** as fast; log-prob passes "
                      f"{_cell(data['log_prob_speed_ratio'])}× as fast.", "",
                      "| metric | " + " | ".join(NAMES[s] for s in SETTINGS) + " |", "|---|" + "---|" * len(SETTINGS)]
            lines += [f"| {label} | " + " | ".join(_cell(rows[s][key]) for s in SETTINGS) + " |"
                      for key, label in ROWS if all(key in rows[s] for s in SETTINGS)]
            lines.append("")
        machine = summary["machine"]
        lines += [f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs; "
                  + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()) + ".", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: grpo, 1 seed, 4 steps, 4 held-out prompts "
                                                             "(with --long: bench/ppo_long.py's small world, 2 steps)")
    parser.add_argument("--long", action="store_true", help="hh-rlhf's shapes on bench/ppo_long.py's random models "
                                                            "instead of the demo (speed only): the long section")
    parser.add_argument("--models", default=os.path.join(ROOT, "outputs", "tiny"),
                        help="a folder with the SFT policy (sft/) and reward model (reward/) (default outputs/tiny)")
    parser.add_argument("--stages", default=None, help="comma-separated: grpo,rloo (default both; grpo with --quick "
                                                       "or --long)")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 42,43,44; 42 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="max_steps (default the recipe's; 4 with --quick or "
                                                                "--long)")
    parser.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts (default all; 4 with --quick)")
    parser.add_argument("--md", default=os.path.join(ROOT, "bench", "results", "group.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "group.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        with open(args.worker) as f:
            worker(json.load(f))
        return
    stage_names = (args.stages or ("grpo" if args.quick or args.long else "grpo,rloo")).split(",")
    seeds = [int(s) for s in (args.seeds or ("42" if args.quick else "42,43,44")).split(",")]
    if args.quick or args.long:
        args.steps = args.steps or (2 if args.quick and args.long else 4)
    if args.quick:
        args.eval_prompts = args.eval_prompts or 4
    gate = base.Gate(per_run_s=0 if args.quick else 30, budget_s=300, retry_budget_s=0)
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-group-") as work:
        if args.long:
            from bench import ppo_long

            shape = ppo_long.QUICK if args.quick else ppo_long.FULL
            world = ppo_long.make_world(work, shape)
            models = "bench/ppo_long.py's world"
            argv = ["--model_name_or_path", world["sft"], "--reward_model_path", world["reward"],
                    "--dataset_name", world["data"], "--max_prompt_length", str(shape["max_prompt_length"]),
                    "--max_completion_length", str(shape["ppo"]["response_length"]),
                    "--eval_max_prompts", "1", "--eval_samples_per_prompt", "1"]
        else:
            for part in ("sft", "reward"):
                if not os.path.isdir(os.path.join(args.models, part)):
                    raise SystemExit(f"bench/group.py: no {part} model in {args.models}: run `make demo` first, or "
                                     "give --models")
            models = os.path.relpath(args.models, ROOT)
            argv = ["--model_name_or_path", os.path.join(args.models, "sft"),
                    "--reward_model_path", os.path.join(args.models, "reward")]
            argv += ["--eval_max_prompts", str(args.eval_prompts)] if args.eval_prompts else []
        argv += ["--max_steps", str(args.steps)] if args.steps else []
        for stage in stage_names:
            for i, seed in enumerate(seeds):  # interleaved: ours, TRL, TRL, ours, ...
                for setting in (SETTINGS if i % 2 else SETTINGS[::-1]):
                    runs.append(run_one(gate, stage, setting, seed, argv, work))
    info = {"quick": args.quick, "seeds": seeds, "models": models, "steps": args.steps,
            "eval_prompts": args.eval_prompts, "wall_s": time.perf_counter() - started,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine()}
    results = json.load(open(args.json)) if os.path.isfile(args.json) else {}
    results = {"tiny": results} if "stages" in results else results  # the file before it held both shapes
    results["long" if args.long else "tiny"] = summarise(runs, info)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    with open(args.md, "w") as f:
        f.write(markdown({key: results[key] for key in SHAPES if key in results}))
    base.say(f"wrote {args.md} and {args.json}")


if __name__ == "__main__":
    main()
