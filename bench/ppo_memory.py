"""Peak memory of PPO at GPT-2 124M size: LoRA on one base model (`share_base_model`) against full PPO.

    python bench/ppo_memory.py                    # GPT2Config() (124M), random weights: one-base LoRA vs full
    python bench/ppo_memory.py --all              # also LoRA with a whole reward model, and share_base_model: false
    python bench/ppo_memory.py --quick            # a small GPT-2 config instead: a smoke run (about a minute)
    python bench/ppo_memory.py --device cuda      # on a GPU: torch.cuda.max_memory_allocated instead of RSS

or `from bench.ppo_memory import measure; measure()` (returns the figures, prints the table).

Models, made once in a work folder (--work, default a temporary one): a byte-level BPE tokenizer trained on the
embedded corpus, a random `GPT2Config()` causal LM as the SFT policy, and a reward model as the reward stage with
use_peft writes one: a random LoRA adapter (task SEQ_CLS, r 16, all-linear, with its `score` head) on that policy in
`reward/adapter`, merged into the sequence classifier in `reward/`. Every configuration trains against that reward
model: full PPO loads it whole (reward, and the value model from it) beside the policy and its reference; one-base
LoRA PPO finds it to be an adapter on the SFT policy and runs it as one (one copy of the base weights for the four
roles); `--all` adds LoRA with the reward model loaded whole (`reward/` with its adapter folder hidden: a copy
without it) and `share_base_model: false` (the old layout: reward and value models whole).

Each configuration runs the pipeline's PPO stage (`pipeline.stages.run("ppo", ...)`, what scripts/ppo.py does) in
a fresh process, on the embedded task's prompts: a few PPO updates (4 rollouts each, 32-token answers, one PPO
epoch), no checkpoints. Measured: the process's peak RSS (`ru_maxrss`) right after `train()` returns (imports,
data, models and training; not the evaluation and the final save), and the RSS after the imports, before anything
loads; on a GPU, `torch.cuda.max_memory_allocated()` at the same point. Printed: each peak, the peak above the
imports, and the ratio one-base / full of both (the issue's target: the peak at most 0.4x full PPO's). One run per
configuration (repeats interleave them); on a busy machine RSS is unaffected, times are.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGURATIONS = {  # name -> (recipe changes, reward model folder)
    "full": ({"use_peft": False}, "reward"),
    "one-base": ({}, "reward"),
    "one-base, whole reward": ({}, "reward-whole"),
    "lora, share_base_model false": ({"share_base_model": False}, "reward"),
}
RECIPE = {
    "dataset_name": "embedded:prompt", "embedded_seed": 0, "max_prompt_length": 64,
    "eval_max_prompts": 1, "eval_samples_per_prompt": 1,
    "use_peft": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_modules": "all-linear",
    "response_length": 32, "stop_token": "eos", "temperature": 0.7,
    "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "local_rollout_forward_batch_size": 4,
    "num_mini_batches": 1, "num_ppo_epochs": 1, "learning_rate": 1.0e-5, "num_sample_generations": 0,
    "logging_steps": 1, "save_strategy": "no", "gradient_checkpointing": False, "report_to": "none",
    "disable_tqdm": True, "seed": 42,
}


def make_models(work: str, quick: bool) -> None:
    """The tokenizer, the random SFT policy and the reward model (adapter + merged) in `work` (once)."""
    if os.path.isfile(os.path.join(work, "reward-whole", "config.json")):
        return
    sys.path.insert(0, ROOT)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from pipeline.embedded.generate import build
    from pipeline.models import fit_to_tokenizer, merge_adapter, train_tokenizer

    torch.manual_seed(0)
    corpus = build("corpus", seed=0, splits=("train",))["train"]["text"]
    tokenizer = train_tokenizer(corpus, vocab_size=2048)
    config = GPT2Config(n_layer=2, n_embd=128, n_head=2) if quick else GPT2Config()  # 124M: 12 x 768, 50257 tokens
    sft = os.path.join(work, "sft")
    fit_to_tokenizer(GPT2LMHeadModel(config), tokenizer).save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    classifier = fit_to_tokenizer(GPT2ForSequenceClassification.from_pretrained(sft, num_labels=1), tokenizer)
    lora = LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules="all-linear",
                      init_lora_weights=False)  # random B too: an adapter that changes the model, as a trained one
    adapter = os.path.join(work, "reward", "adapter")
    get_peft_model(classifier, lora).save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    merge_adapter(adapter, os.path.join(work, "reward"), overwrite=True)
    shutil.copytree(os.path.join(work, "reward"), os.path.join(work, "reward-whole"),
                    ignore=shutil.ignore_patterns("adapter"))


def child(recipe: str, result: str, device: str) -> None:
    """One configuration: the PPO stage, the peaks read when train() returns."""
    sys.path.insert(0, ROOT)
    import torch

    from pipeline.stages import run
    from pipeline.trainers.ppo import PPOTrainer

    figures = {"rss_after_imports_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    original = PPOTrainer.train

    def train(trainer, *args, **kwargs):
        output = original(trainer, *args, **kwargs)
        figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if device == "cuda":
            figures["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        figures["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        figures["optimizer_steps"] = trainer.state.global_step
        return output

    PPOTrainer.train = train
    run("ppo", ["--config", recipe])
    with open(result, "w") as f:
        json.dump(figures, f)


def measure(work: str | None = None, quick: bool = False, device: str = "cpu", names=("full", "one-base"),
            repeats: int = 1, updates: int = 2) -> dict:
    """Run each configuration in its own process (`repeats` times, interleaved, the order reversed every other
    round); print and return {name: [figures per run]} and the ratios to full PPO."""
    import yaml

    work = work or tempfile.mkdtemp(prefix="ppo-memory-")
    os.makedirs(work, exist_ok=True)
    # in a process of its own: a child's ru_maxrss starts from its parent's RSS at the fork (Linux keeps the high-water
    # mark across fork and exec), so this process never imports torch
    subprocess.run([sys.executable, os.path.abspath(__file__), "--make-models", work] + (["--quick"] if quick else []),
                   cwd=ROOT, check=True)
    runs = {name: [] for name in names}
    for round_ in range(repeats):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            changes, reward = CONFIGURATIONS[name]
            tag = name.replace(" ", "-").replace(",", "")
            recipe = {**RECIPE, **changes, "sft_model_path": os.path.join(work, "sft"),
                      "reward_model_path": os.path.join(work, reward), "output_dir": os.path.join(work, "out", tag),
                      "total_episodes": updates * RECIPE["per_device_train_batch_size"],
                      "use_cpu": device == "cpu", "bf16": False}
            shutil.rmtree(recipe["output_dir"], ignore_errors=True)
            path = os.path.join(work, f"{tag}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(recipe, f)
            result = os.path.join(work, f"{tag}.json")
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, result, device],
                                  cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{name}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
            with open(result) as f:
                runs[name].append(json.load(f))
    key = "peak_cuda_mb" if device == "cuda" else "peak_rss_mb"

    def median(values):
        values = sorted(values)
        return values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2

    summary = {}
    for name, figures in runs.items():
        peak = median([f[key] for f in figures])
        above = median([f[key] - (0 if device == "cuda" else f["rss_after_imports_mb"]) for f in figures])
        summary[name] = {"peak_mb": peak, "above_imports_mb": above,
                         "trainable_parameters": figures[0]["trainable_parameters"]}
    full = summary.get("full")
    print(f"PPO peak memory ({'GPU allocated' if device == 'cuda' else 'RSS'}, when train() returns), "
          f"{'small config' if quick else 'GPT2Config() 124M'}, {updates} updates, median of {repeats} run(s):")
    print(f"{'configuration':32} {'peak MB':>9} {'above imports MB':>17} {'ratio':>6} {'ratio above':>12}")
    for name, row in summary.items():
        ratio = row["peak_mb"] / full["peak_mb"] if full else float("nan")
        ratio_above = row["above_imports_mb"] / full["above_imports_mb"] if full else float("nan")
        row.update(ratio_to_full=ratio, ratio_to_full_above_imports=ratio_above)
        print(f"{name:32} {row['peak_mb']:9.0f} {row['above_imports_mb']:17.0f} {ratio:6.2f} {ratio_above:12.2f}")
    return {"runs": runs, "summary": summary}


def write_markdown(figures: dict, path: str) -> None:
    """The table of `measure`'s figures, as bench/results/ppo_memory.md holds it."""
    meta = figures.get("meta", {})
    lines = ["# PPO peak memory: LoRA on one base model against full PPO", "",
             f"`python bench/ppo_memory.py {meta.get('flags', '')}`".replace(" `", "`"), "",
             f"{meta.get('model', 'GPT2Config() 124M')}, {meta.get('updates', 2)} PPO updates of 4 rollouts, "
             f"{meta.get('measure', 'peak RSS when train() returns')}; median of {meta.get('repeats', 1)} run(s) per "
             "configuration, each in its own process. How it is measured: the script's docstring."
             + (f" Machine: {meta['machine']}." if meta.get("machine") else ""), "",
             "| configuration | peak MB | above the imports MB | vs full | vs full, above the imports | trained parameters |",
             "|---|---|---|---|---|---|"]
    for name, row in figures["summary"].items():
        lines.append(f"| {name} | {row['peak_mb']:,.0f} | {row['above_imports_mb']:,.0f} | {row['ratio_to_full']:.2f} | "
                     f"{row['ratio_to_full_above_imports']:.2f} | {row['trainable_parameters']:,} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    if argv is None and sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:5])
        return
    if argv is None and sys.argv[1:2] == ["--make-models"]:
        make_models(sys.argv[2], quick="--quick" in sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="folder for the models and runs (kept; default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="a small GPT-2 config: a smoke run")
    parser.add_argument("--all", action="store_true", help="also LoRA with a whole reward model, and "
                        "share_base_model: false")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--updates", type=int, default=2, help="PPO updates of 4 rollouts each")
    parser.add_argument("--json", help="write the figures here (e.g. bench/results/ppo_memory.json)")
    parser.add_argument("--md", help="write the table here (e.g. bench/results/ppo_memory.md)")
    parser.add_argument("--ppo-json", help="also write the `memory_124m` entry of the PPO results JSON here "
                                           "(bench/results/ppo.json)")
    args = parser.parse_args(argv)
    names = tuple(CONFIGURATIONS) if args.all else ("full", "one-base")
    figures = measure(args.work, args.quick, args.device, names, args.repeats, args.updates)
    flags = [flag for flag, on in (("--all", args.all), ("--quick", args.quick)) if on]
    flags += [f"--{name} {value}" for name, value, default in (("device", args.device, "cpu"),
                                                               ("repeats", args.repeats, 1),
                                                               ("updates", args.updates, 2)) if value != default]
    figures["meta"] = {"flags": " ".join(flags),
                       "model": "a small GPT-2 config" if args.quick else "GPT2Config() 124M (random weights)",
                       "updates": args.updates, "repeats": args.repeats,
                       "measure": "torch.cuda.max_memory_allocated when train() returns" if args.device == "cuda"
                       else "peak RSS (ru_maxrss) when train() returns"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    if args.md:
        write_markdown(figures, args.md)
    if args.ppo_json:
        write_ppo_entry(figures, args.ppo_json)


def write_ppo_entry(figures: dict, path: str) -> None:
    """The `memory_124m` entry of bench/results/ppo.json (beside bench/ppo_vs_trl112.py's `tiny` and
    bench/ppo_long.py's `long`): one-base LoRA PPO's peak over full PPO's."""
    results = json.load(open(path)) if os.path.isfile(path) else {}
    summary = figures["summary"]
    results["memory_124m"] = {
        "peak_ratio_one_base_vs_full": summary["one-base"]["ratio_to_full"],
        "peak_ratio_one_base_vs_full_above_imports": summary["one-base"]["ratio_to_full_above_imports"],
        "peak_mb": {name: row["peak_mb"] for name, row in summary.items()},
        "target": "one-base LoRA PPO peak <= 0.4x full PPO",
        "met": summary["one-base"]["ratio_to_full"] <= 0.4,
        "details": "bench/results/ppo_memory.md (python bench/ppo_memory.py)", **figures["meta"]}
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
