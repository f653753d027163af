"""`make bench`, PPO at long shapes: the pipeline's PPOTrainer against TRL 1.12's on hh-rlhf-like lengths.

    python bench/ppo_long.py            # 3 seeds each, interleaved (a few minutes per run)
    python bench/ppo_long.py --quick    # a smoke run: 1 seed, a smaller model, fewer and shorter rows

Writes the `long` entry of bench/results/ppo.json and its section of bench/results/ppo.md.

The tiny demo's prompts are all about as long and its answers short, so padding costs it less than it costs
users. Here the shapes are those of hh-rlhf: prompts of a long-tailed length (log-normal, 16 to 380 tokens, the
median about 75), answers that end anywhere up to 128 tokens, and a model whose matrix products dominate (GPT-2
config, 6 layers x 512, an 8192-token vocabulary). The models are random (no quality is measured, only speed):

* a word-level tokenizer (`w0` ... `w8188`, EOS, pad, unk) and prompts of random words, written as a local dataset
  (train and test JSON Lines) that the PPO stage loads by path, as a user's file;
* the policy: a random GPT2LMHeadModel whose EOS is made likely enough for answers to end at varied lengths
  (its final layer norm gets a bias along one direction and EOS's output row reads that direction: about 1 answer
  in 50 ends at each token, so lengths spread over 1-128 and some run to the end); the reward and value model: a
  random GPT2ForSequenceClassification with one label.

Both trainers run the same recipe (recipes/tiny/ppo.yaml's fields with the sizes below) on the same tokenized
prompts, through bench/ppo_vs_trl112.py's machinery: each run its own process, interleaved with seeds 42, 43,
44, waiting for a quiet machine. Measured: episodes/s of `train()`, and the fraction of the tokens the models
computed in the scoring passes and the PPO epochs that were padding (ours: `PPOTrainer.token_counts`; TRL 1.12:
its `forward`/`get_reward` calls' rows, all positions against the non-pad ones).
"""

import argparse
import datetime
import json
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import yaml  # noqa: E402

from bench import ppo_vs_trl112 as base  # noqa: E402

MARKS = ("<!-- bench/ppo_long.py: start -->", "<!-- bench/ppo_long.py: end -->")
SPEED_TARGET, PADDING_TARGET = 3.0, 0.10  # ours / TRL 1.12 episodes/s at least; ours' padding fraction below
FULL = {"layers": 6, "width": 512, "heads": 8, "vocabulary": 8192, "prompts": 64, "eval_prompts": 8,
        "ppo": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 2, "num_mini_batches": 1,
                "local_rollout_forward_batch_size": 32, "total_episodes": 64, "num_ppo_epochs": 2,
                "response_length": 128}, "max_prompt_length": 384, "prompt_range": (16, 380), "eos_every": 50}
QUICK = {"layers": 2, "width": 64, "heads": 2, "vocabulary": 512, "prompts": 16, "eval_prompts": 4,
         "ppo": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "num_mini_batches": 1,
                 "local_rollout_forward_batch_size": 8, "total_episodes": 16, "num_ppo_epochs": 1,
                 "response_length": 24}, "max_prompt_length": 64, "prompt_range": (4, 60), "eos_every": 8}


def make_world(work: str, shape: dict) -> dict:
    """The tokenizer, the two random models and the prompt files (see the module's docstring)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

    from pipeline.models import CHAT_TEMPLATE

    words = [f"w{i}" for i in range(shape["vocabulary"] - 3)]
    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "<|pad|>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = GPT2Config(vocab_size=len(vocab), n_layer=shape["layers"], n_embd=shape["width"],
                        n_head=shape["heads"], n_positions=shape["max_prompt_length"] + shape["ppo"]["response_length"],
                        bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(config)
    with torch.no_grad():  # EOS about once in `eos_every` tokens at temperature 0.7 (module docstring)
        direction = torch.nn.functional.normalize(torch.randn(shape["width"]), dim=0)
        scale = 10.0
        policy.transformer.ln_f.bias.copy_(scale * direction)
        logit = 0.7 * (torch.log(torch.tensor(float(len(vocab)) / (shape["eos_every"] - 1)))).item()
        policy.lm_head.weight[0] = direction * logit / scale
    policy.generation_config.eos_token_id, policy.generation_config.pad_token_id = 0, 1
    scorer = GPT2ForSequenceClassification(GPT2Config(**{**config.to_dict(), "num_labels": 1}))
    paths = {"sft": os.path.join(work, "models", "policy"), "reward": os.path.join(work, "models", "reward"),
             "data": os.path.join(work, "data", "prompts")}
    for model, path in ((policy, paths["sft"]), (scorer, paths["reward"])):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    rng = random.Random(0)
    low, high = shape["prompt_range"]
    os.makedirs(paths["data"], exist_ok=True)
    lengths = []
    for split, count in (("train", shape["prompts"]), ("test", shape["eval_prompts"])):
        with open(os.path.join(paths["data"], f"{split}.jsonl"), "w") as f:
            for _ in range(count):
                n = min(high, max(low, round(rng.lognormvariate(4.3, 0.75) * high / 380)))
                lengths.append(n)
                f.write(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(n))}) + "\n")
    paths["prompt_tokens"] = sorted(lengths[:shape["prompts"]])
    return paths


def recipe_for(world: dict, shape: dict) -> dict:
    recipe = yaml.safe_load(open(os.path.join(base.RECIPES, "ppo.yaml")))
    recipe.update(shape["ppo"])
    recipe.update(sft_model_path=world["sft"], reward_model_path=world["reward"], dataset_name=world["data"],
                  max_prompt_length=shape["max_prompt_length"], save_strategy="no", report_to="none",
                  disable_tqdm=True, eval_max_prompts=1, eval_samples_per_prompt=1, logging_steps=1)
    return recipe


def summarise(info: dict, runs: list) -> dict:
    ours = sorted((r for r in runs if r["impl"] == "ours"), key=lambda r: r["seed"])
    trl = sorted((r for r in runs if r["impl"] == "trl112"), key=lambda r: r["seed"])
    speed = base.paired([r["episodes_per_s"] for r in ours], [r["episodes_per_s"] for r in trl])
    pad_ours, pad_trl = base.stat([base.padding_fraction(r) for r in ours]), base.stat([base.padding_fraction(r) for r in trl])
    split = {impl: {part: base.stat([r["split_s"][part] / r["train_s"] for r in rs])
                    for part in ("generation", "scoring", "ppo_epochs")} for impl, rs in (("ours", ours),
                                                                                       ("trl112", trl))}
    return {"episodes_per_s_ratio": speed["median"], "padding_fraction_ours": pad_ours["median"],
            "padding_fraction_trl112": pad_trl["median"],
            "targets": [{"target": f"episodes/s: ours / TRL 1.12 >= {SPEED_TARGET}x", "measured": speed["median"],
                         "met": speed["median"] >= SPEED_TARGET},
                        {"target": f"padding: under {PADDING_TARGET:.0%} of ours' computed tokens",
                         "measured": pad_ours["median"], "met": pad_ours["median"] < PADDING_TARGET}],
            "ratios": {"episodes_per_s": speed},
            "rows": {"ours": {"episodes_per_s": base.stat([r["episodes_per_s"] for r in ours]),
                              "padding_fraction": pad_ours, "train_s": base.stat([r["train_s"] for r in ours])},
                     "trl112": {"episodes_per_s": base.stat([r["episodes_per_s"] for r in trl]),
                                "padding_fraction": pad_trl, "train_s": base.stat([r["train_s"] for r in trl])}},
            "time_split": split, **info, "runs": runs}


def section(summary: dict) -> str:
    s, shape = summary, summary["shape"]
    speed = s["ratios"]["episodes_per_s"]
    lines = [MARKS[0], "## PPO at long shapes: ours vs TRL 1.12", "",
             f"Generated by `python bench/ppo_long.py` on {s['date']}, in {s['bench_wall_s']:.0f} s "
             f"({s['settings']['mode']} run); raw figures under `long` in [`ppo.json`](ppo.json). Do not edit by "
             "hand: rerun.", "",
             f"Random GPT-2 models ({shape['layers']} layers x {shape['width']}, {shape['vocabulary']}-token "
             f"vocabulary), prompts of {min(s['prompt_tokens'])}-{max(s['prompt_tokens'])} tokens (median "
             f"{s['prompt_tokens'][len(s['prompt_tokens']) // 2]}, log-normal), answers ending anywhere up to "
             f"{shape['ppo']['response_length']} tokens; {shape['ppo']['total_episodes']} episodes, "
             f"{shape['ppo']['per_device_train_batch_size']} rows per micro-batch, "
             f"{shape['ppo']['num_ppo_epochs']} PPO epochs; seeds {', '.join(map(str, s['settings']['seeds']))}, "
             "each run its own process, interleaved. Ours ran with `padding_free: "
             f"{s['runs'][0].get('padding_free', 'auto')}`. How the models and data are made: the docstring of "
             "`bench/ppo_long.py`.", "",
             "| target | measured | verdict |", "|---|---|---|"]
    for t in s["targets"]:
        figure = f"{t['measured']:.2f}x" if "episodes" in t["target"] else f"{t['measured']:.1%}"
        lines.append(f"| {t['target']} | {figure} | {'**met**' if t['met'] else '**missed**'} |")
    lines += ["", "| | ours | TRL 1.12 |", "|---|---|---|"]
    rows = s["rows"]
    lines.append(f"| episodes/s (median, min-max) | {base._spread(rows['ours']['episodes_per_s'])} | "
                 f"{base._spread(rows['trl112']['episodes_per_s'])} |")
    lines.append(f"| padding, of the tokens computed in scoring and PPO epochs | "
                 f"{rows['ours']['padding_fraction']['median']:.1%} | {rows['trl112']['padding_fraction']['median']:.1%} |")
    for part, label in (("generation", "time: generation"), ("scoring", "time: scoring passes"),
                        ("ppo_epochs", "time: PPO epochs")):
        lines.append(f"| {label} (share of train()) | {s['time_split']['ours'][part]['median']:.0%} | "
                     f"{s['time_split']['trl112'][part]['median']:.0%} |")
    lines.append(f"| episodes/s ratio per seed | {', '.join(f'{x:.2f}x' for x in speed['paired'])} | |")
    return "\n".join(lines) + "\n" + MARKS[1] + "\n"


def write(summary: dict, md: str, js: str) -> None:
    results = json.load(open(js)) if os.path.isfile(js) else {}
    results["long"] = summary
    with open(js, "w") as f:
        json.dump(results, f, indent=2)
    text = section(summary)
    old = open(md).read() if os.path.isfile(md) else "# Benchmarks: PPO\n"
    if MARKS[0] in old and MARKS[1] in old:
        head, rest = old.split(MARKS[0], 1)
        new = head + text.rstrip("\n") + rest.split(MARKS[1], 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with open(md, "w") as f:
        f.write(new)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, a small model, short rows")
    parser.add_argument("--seeds", help="comma-separated seeds (default 42,43,44; 42 with --quick)")
    parser.add_argument("--md", default=os.path.join(ROOT, "bench", "results", "ppo.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "ppo.json"))
    parser.add_argument("--trl112-venv", default=base.DEFAULT_VENV)
    parser.add_argument("--trl112-python", help="use this Python (with trl 1.12.0) instead of --trl112-venv's")
    parser.add_argument("--workdir", help="keep the models, runs and logs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    s = base.settings(args.quick)
    if args.seeds:
        s["seeds"] = [int(x) for x in args.seeds.split(",")]
    shape = QUICK if args.quick else FULL
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench-ppo-long-"))
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    began = datetime.datetime.now(datetime.timezone.utc)
    try:
        python112 = args.trl112_python or base.ensure_venv(os.path.abspath(args.trl112_venv))
        versions = {"main": base.versions_of(sys.executable), "trl112": base.versions_of(python112)}
        hide = [p for p in base.OPTIONAL if versions["main"].get(p) and not versions["trl112"].get(p)]
        base.say(f"making the random models and the long-tailed prompts in {work}")
        world = make_world(work, shape)
        recipe = recipe_for(world, shape)
        data = base.prepare_data(work, recipe)
        gate = base.Gate(s["wait_for_quiet_s"], s["wait_budget_s"], s["retry_budget_s"])
        runs = []
        for i, seed in enumerate(s["seeds"]):
            for impl in (("ours", "trl112") if i % 2 == 0 else ("trl112", "ours")):
                result = base.measured_run(gate, impl, seed, recipe, work, data, python112, s["timeout_s"], hide)
                base.say(f"{impl:6s} seed {seed}: {result['episodes_per_s']:.2f} episodes/s ({result['train_s']:.1f} s"
                         f"), padding {base.padding_fraction(result):.1%} of computed tokens, other load "
                         f"{result['other_load_cores']:.2f} cores")
                runs.append(result)
        from bench.run import machine

        info = {"settings": s, "shape": shape, "date": began.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                "versions": versions, "recipe": recipe, "prompt_tokens": world["prompt_tokens"],
                "waited_for_quiet_s": gate.waited_s, "bench_wall_s": time.perf_counter() - base.STARTED}
        summary = summarise(info, runs)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    write(summary, args.md, args.json)
    print(section(summary))
    base.say(f"wrote {args.md} and {args.json}")


if __name__ == "__main__":
    main()
