"""`make bench`, the reward stage at hh-rlhf's shapes: its preference pairs padded (TRL's RewardTrainer as is) against
padding-free (`padding_free: auto`, as shipped).

    python bench/reward_long.py            # 3 seeds per setting, interleaved (a few minutes)
    python bench/reward_long.py --quick    # a smoke run: 1 seed, a smaller model, shorter pairs

TRL's preference collator pads every batch's chosen and rejected rows on the right to the batch's longest. With
hh-rlhf's transcripts (a long tail of prompt lengths, answers of any length) most of what the model computes is
then padding, and attention grows with the square of the padded width. Both settings run the pipeline's reward
stage (`pipeline.stages.run("reward", ...)`, what `scripts/reward.py` runs) with `recipes/gpt2-hh/reward.yaml`'s
settings (max_length 512, 16 pairs x 2 accumulated micro-batches per step, gradient checkpointing; bf16 off: the CPU)
for a few steps, on bench/ppo_long.py's world: a random GPT-2 sequence classifier (6 layers x 512, an 8192-token
vocabulary) and a word-level tokenizer, with pairs written as a local JSON Lines dataset (a prompt of a log-normal
length, 16 to 380 tokens, median about 75, then a chosen and a rejected answer of 1 to 128 tokens each). The two
settings differ only in `padding_free` (`off` against `auto`, which packs on this CPU); their losses and gradients
are the same to float rounding (tests/test_padding_free.py), so only speed is measured here: seconds of `train()`,
and the share of the tokens the model computed that were padding. Each run is its own process, after waiting for
a quiet machine (bench/ppo_vs_trl112.py's `Gate`). Writes bench/results/reward_long.md and .json.
"""

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import ppo_long  # noqa: E402
from bench import ppo_vs_trl112 as base  # noqa: E402
from bench.run import machine  # noqa: E402

SETTINGS = ("off", "auto")
NAMES = {"off": "padded (TRL's RewardTrainer)", "auto": "padding-free (ours, `padding_free: auto`)"}
FULL = {"world": ppo_long.FULL, "pairs": 64, "answer": 128, "steps": 2}
QUICK = {"world": ppo_long.QUICK, "pairs": 8, "answer": 24, "steps": 1,
         "overrides": ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]}


def write_pairs(world: dict, shape: dict, folder: str) -> None:
    """Preference pairs of random words in the world's vocabulary: train.jsonl (`pairs` rows) and test.jsonl (8)."""
    rng = random.Random(0)
    vocabulary = shape["world"]["vocabulary"] - 3  # the words w0 ... of bench/ppo_long.py's tokenizer
    low, high = shape["world"]["prompt_range"]

    def words(n):
        return " ".join(f"w{rng.randrange(vocabulary)}" for _ in range(n))

    os.makedirs(folder, exist_ok=True)
    for split, count in (("train", shape["pairs"]), ("test", 8)):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for _ in range(count):
                n = min(high, max(low, round(rng.lognormvariate(4.3, 0.75) * high / 380)))
                f.write(json.dumps({"prompt": words(n), "chosen": " " + words(rng.randint(1, shape["answer"])),
                                    "rejected": " " + words(rng.randint(1, shape["answer"]))}) + "\n")


def worker(spec: dict) -> None:
    """One reward stage run in this process; seconds of train() and the tokens the model computed, to a file."""
    import torch
    from trl import RewardTrainer

    from pipeline import padding_free, stages

    tokens = {"real": 0, "computed": 0}
    original_train = RewardTrainer.train
    timed = {}

    def train(self, *args, **kwargs):
        model = self.accelerator.unwrap_model(self.model)
        outer = model.get_base_model() if hasattr(model, "get_base_model") else model

        def real(module, args, kwargs):
            if torch.is_grad_enabled():  # training passes only (the evaluation's are not in train())
                tokens["real"] += int(kwargs["attention_mask"].sum())

        def computed(module, args, kwargs):
            if torch.is_grad_enabled():
                ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]  # GPT-2 passes it by position
                tokens["computed"] += ids.numel()

        hooks = [outer.register_forward_pre_hook(real, with_kwargs=True),
                 padding_free.body(outer).register_forward_pre_hook(computed, with_kwargs=True)]
        start = time.perf_counter()
        try:
            return original_train(self, *args, **kwargs)
        finally:
            timed["train_s"] = time.perf_counter() - start
            for hook in hooks:
                hook.remove()

    RewardTrainer.train = train
    stages.run("reward", spec["argv"])
    with open(spec["result_file"], "w") as f:
        json.dump({"setting": spec["setting"], "seed": spec["seed"], **timed, "tokens": tokens,
                   "padding_fraction": 1 - tokens["real"] / tokens["computed"]}, f, indent=2)


def run_one(gate, setting: str, seed: int, argv: list, work: str) -> dict:
    name = f"{setting}-{seed}"
    result = base.run_worker(gate, __file__, name, {"setting": setting, "seed": seed, "argv": [
        *argv, "--padding_free", setting, "--seed", str(seed), "--output_dir", os.path.join(work, name)]}, work)
    base.say(f"{name}: train {result['train_s']:.2f} s, padding {result['padding_fraction']:.3f}, other load "
             f"{result['other_load_cores']:.2f}")
    return result


def summarise(runs: list, info: dict) -> dict:
    by_seed = sorted(runs, key=lambda r: r["seed"])
    rows = {setting: {key: base.stat([r[key] for r in by_seed if r["setting"] == setting])
                      for key in ("train_s", "padding_fraction", "other_load_cores")} for setting in SETTINGS}
    paired = [p["train_s"] / o["train_s"] for o in runs for p in runs
              if o["setting"] == "auto" and p["setting"] == "off" and o["seed"] == p["seed"]]
    return dict(info, rows=rows, speed_ratio=base.stat(paired), runs=runs)


def _cell(st: dict, fmt: str) -> str:
    text = format(st["median"], fmt)
    return text if st["min"] == st["max"] else f"{text} ({format(st['min'], fmt)}–{format(st['max'], fmt)})"


def markdown(s: dict) -> str:
    world, ratio = s["shape"]["world"], s["speed_ratio"]
    lines = ["# Benchmarks: the reward stage at hh-rlhf's shapes, padded against padding-free", "",
             f"Generated by `python bench/reward_long.py` on {s['date']}, in {s['wall_s']:.0f} s"
             f"{' (a quick smoke run)' if s['quick'] else ''}; raw figures in [`reward_long.json`](reward_long.json). "
             "Do not edit by hand: rerun.", "",
             f"The reward stage with `recipes/gpt2-hh/reward.yaml`'s settings for {s['steps']} optimizer step{'s' * (s['steps'] > 1)}, on a "
             f"random GPT-2 sequence classifier ({world['layers']} layers x {world['width']}, a vocabulary of "
             f"{world['vocabulary']} tokens) and pairs of a long-tailed prompt ({world['prompt_range'][0]}"
             f"-{world['prompt_range'][1]} tokens) and two answers of 1-{s['shape']['answer']} tokens; "
             f"`padding_free: off` (TRL's padded rows) against `auto` (packed on the CPU), seeds "
             f"{', '.join(map(str, s['seeds']))}, each run its own process, interleaved. The losses and gradients "
             "are the same either way to float rounding (tests/test_padding_free.py); how it is made: the docstring "
             "of `bench/reward_long.py`. A cell is the median over the seeds (min–max).", "",
             f"train(): padding-free is **{_cell(ratio, '.2f')}×** as fast (the per-seed ratios of padded seconds "
             "over padding-free).", "",
             "| | " + " | ".join(NAMES[x] for x in SETTINGS) + " |", "|---|---|---|"]
    for key, label, fmt in (("train_s", "train() s", ".1f"),
                            ("padding_fraction", "padding, of the tokens the model computed", ".1%"),
                            ("other_load_cores", "other processes' CPU use (cores)", ".2f")):
        lines.append(f"| {label} | " + " | ".join(_cell(s["rows"][x][key], fmt) for x in SETTINGS) + " |")
    m = s["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; "
              + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, bench/ppo_long.py's small world")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 42,43,44; 42 with --quick)")
    parser.add_argument("--md", default=os.path.join(ROOT, "bench", "results", "reward_long.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "reward_long.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        with open(args.worker) as f:
            worker(json.load(f))
        return
    shape = QUICK if args.quick else FULL
    seeds = [int(x) for x in (args.seeds or ("42" if args.quick else "42,43,44")).split(",")]
    gate = base.Gate(per_run_s=0 if args.quick else 30, budget_s=300, retry_budget_s=0)
    started, runs = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="bench-reward-") as work:
        world = ppo_long.make_world(work, shape["world"])
        data = os.path.join(work, "data", "pairs")
        write_pairs(world, shape, data)
        argv = ["--config", os.path.join(ROOT, "recipes", "gpt2-hh", "reward.yaml"),
                "--model_name_or_path", world["reward"], "--dataset_name", data, "--max_steps", str(shape["steps"]),
                "--bf16", "false", "--use_cpu", "true", "--save_strategy", "no",
                "--report_to", "none", "--disable_tqdm", "true", "--warmup_steps", "0",
                "--max_length", str(shape["world"]["max_prompt_length"] + shape["world"]["ppo"]["response_length"]),
                *shape.get("overrides", [])]  # max_length: the model's positions (the recipe's 512 at full size)
        for index, seed in enumerate(seeds):  # interleaved: A B, B A, A B
            for setting in (SETTINGS if index % 2 == 0 else SETTINGS[::-1]):
                runs.append(run_one(gate, setting, seed, argv, work))
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": time.perf_counter() - started, "quick": args.quick, "seeds": seeds, "steps": shape["steps"],
            "shape": {k: v for k, v in shape.items() if k != "overrides"}, "machine": machine()}
    summary = summarise(runs, info)
    os.makedirs(os.path.dirname(args.md) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=2)
    with open(args.md, "w") as f:
        f.write(markdown(summary))
    base.say(f"reward at long shapes: padding-free {summary['speed_ratio']['median']:.2f}x as fast; "
             f"wrote {args.md}")


if __name__ == "__main__":
    main()
