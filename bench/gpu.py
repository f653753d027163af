"""`make bench-gpu`: the GPU table, in one command, for when a GPU is lent.

    python bench/gpu.py            # on a GPU: bench/results/gpu.md and gpu.json
    python bench/gpu.py --smoke    # on the CPU at tiny sizes: every row runs (tests/test_bench.py, in CI)

Rows, each measured in a process of its own (so that its peak memory is its own):

* `sft`: GPT-2 124M (`GPT2Config()`, random weights; its `gelu_new` run as PyTorch's fused tanh GELU, as every stage
  loads GPT-2: `pipeline.models.fused_tanh_gelu`) trained on 1024-token rows with AdamW, bf16 autocast:
  tokens/s and model FLOPs utilisation (MFU: 6 x parameters + 12 x layers x width x sequence FLOPs per token,
  the PaLM appendix's count, over the GPU's dense bf16 peak from `PEAK_TFLOPS`).
* `ppo-padded`, `ppo`: the pipeline's PPO stage (`bench/ours_ppo.py`: `pipeline.stages.run("ppo", ...)`) on
  GPT-2 124M random policy and reward/value models with prompts of a long-tailed length up to 256 tokens and
  answers ending anywhere up to 256 (bench/ppo_long.py's world), `padding_free: off` (TRL 1.12's padded rows)
  and `auto`: sequences/s of `train()`, the padding share of the computed tokens, peak GPU memory.
* `ppo-lora`: the same with LoRA (`use_peft`): peak GPU memory against the full `ppo` row.
* `*-flash`: the PPO rows again with `attn_implementation: flash_attention_2`, where flash-attn is installed.

--smoke swaps every size for a tiny one and runs on the CPU in float32; its figures mean nothing.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import ppo_long  # noqa: E402
from bench import ppo_vs_trl112 as base  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}  # dense bf16
GPU = {"sft": {"rows": 8, "length": 1024, "steps": 10, "warmup": 3, "config": {}},
       "ppo": {"layers": 12, "width": 768, "heads": 12, "vocabulary": 50257, "prompts": 128, "eval_prompts": 4,
               "ppo": {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 2, "num_mini_batches": 1,
                       "local_rollout_forward_batch_size": 64, "total_episodes": 128, "num_ppo_epochs": 2,
                       "response_length": 256}, "max_prompt_length": 256, "prompt_range": (16, 256),
               "eos_every": 100}}
SMOKE = {"sft": {"rows": 2, "length": 32, "steps": 2, "warmup": 1,
                 "config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 256, "n_positions": 64}},
         "ppo": {**ppo_long.QUICK, "ppo": {**ppo_long.QUICK["ppo"], "total_episodes": 8}, "prompts": 8}}


def flash_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("flash_attn") is not None


def sft_row(sizes: dict, out: str) -> None:
    """One `sft` measurement in this process."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.models import fused_tanh_gelu

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    config = GPT2Config(**sizes["config"])
    model = fused_tanh_gelu(GPT2LMHeadModel(config)).to(device)  # its activation as every stage loads GPT-2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = torch.randint(0, config.vocab_size, (sizes["rows"], sizes["length"]), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
    for step in range(sizes["warmup"] + sizes["steps"]):
        if step == sizes["warmup"]:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast:
            loss = model(input_ids=rows, labels=rows, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = sizes["rows"] * sizes["length"] * sizes["steps"] / seconds
    parameters = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * parameters + 12 * config.n_layer * config.n_embd * sizes["length"]
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    result = {"row": "sft", "device": name, "tokens_per_s": tokens_per_s, "parameters": parameters,
              "mfu": flops_per_token * tokens_per_s / (peak * 1e12) if peak else None,
              "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None, "loss": loss.item()}
    with open(out, "w") as f:
        json.dump(result, f)


def ppo_rows(work: str, shape: dict, gpu: bool, timeout: float) -> list:
    world = ppo_long.make_world(work, shape)
    recipe = ppo_long.recipe_for(world, shape)
    if gpu:
        recipe.update(use_cpu=False, bf16=True)
    data = base.prepare_data(work, recipe)
    variants = [("ppo-padded", {"padding_free": "off"}), ("ppo", {"padding_free": "auto"}),
                ("ppo-lora", {"padding_free": "auto", "use_peft": True, "lora_r": 16, "lora_alpha": 32,
                              "lora_target_modules": "all-linear", "lora_dropout": 0.0})]
    if flash_installed():
        variants += [(f"{name}-flash", {**fields, "attn_implementation": "flash_attention_2"})
                     for name, fields in variants]
    results = []
    for i, (name, fields) in enumerate(variants):
        run = base.run_one("ours", 42 + i, dict(recipe, **fields), work, data, None, timeout, [])
        tokens = run["tokens"]
        results.append({"row": name, "sequences_per_s": run["episodes_per_s"], "train_s": run["train_s"],
                        "padding_fraction": 1 - tokens["real"] / tokens["computed"],
                        "padding_free": run.get("padding_free"), "peak_gpu_mb": run.get("peak_gpu_mb"),
                        "peak_rss_mb": run["peak_rss_mb"], "fields": fields})
        base.say(f"{name}: {run['episodes_per_s']:.2f} sequences/s, padding {results[-1]['padding_fraction']:.1%}")
    return results


def table(summary: dict) -> str:
    lines = ["# Benchmarks: GPU", "",
             f"Generated by `make bench-gpu` (`python bench/gpu.py{' --smoke' if summary['smoke'] else ''}`) on "
             f"{summary['date']}, device: {summary['device']}; raw figures in [`gpu.json`](gpu.json). Do not edit "
             "by hand: rerun. What each row measures: the docstring of `bench/gpu.py`."
             + (" **A CPU smoke run at tiny sizes: its figures mean nothing.**" if summary["smoke"] else ""), "",
             "| row | throughput | MFU | padding | peak GPU memory |", "|---|---|---|---|---|"]
    for row in summary["rows"]:
        speed = (f"{row['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in row
                 else f"{row['sequences_per_s']:.2f} sequences/s")
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "n/a"
        padding = f"{row['padding_fraction']:.1%}" if "padding_fraction" in row else ""
        memory = f"{row['peak_gpu_mb']:,.0f} MB" if row.get("peak_gpu_mb") is not None else "n/a (CPU)"
        lines.append(f"| `{row['row']}` | {speed} | {mfu} | {padding} | {memory} |")
    ratios = summary["ratios"]
    memory = "n/a (no GPU)" if ratios["lora_memory"] is None else f"{ratios['lora_memory']:.2f}x"
    lines += ["", f"padding-free / padded PPO sequences/s: {ratios['ppo_speedup']:.2f}x; one-base LoRA / full PPO "
              f"peak memory: {memory}"
              + ("" if flash_installed() or summary["smoke"] else "; flash-attn is not installed: no flash rows"),
              ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: every row runs; figures meaningless")
    parser.add_argument("--md", default=os.path.join(ROOT, "bench", "results", "gpu.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "gpu.json"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--sft-row", nargs=2, metavar=("SIZES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sft_row:
        return sft_row(json.loads(args.sft_row[0]), args.sft_row[1])
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.smoke:
        raise SystemExit("bench/gpu.py: no GPU here (torch.cuda.is_available() is False); --smoke runs it on the "
                         "CPU at tiny sizes")
    sizes = SMOKE if args.smoke else GPU
    work = tempfile.mkdtemp(prefix="bench-gpu-")
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    began = datetime.datetime.now(datetime.timezone.utc)
    out = os.path.join(work, "sft.json")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--sft-row", json.dumps(sizes["sft"]), out],
                   check=True, cwd=ROOT, timeout=args.timeout)
    rows = [json.load(open(out))]
    base.say(f"sft: {rows[0]['tokens_per_s']:,.0f} tokens/s")
    rows += ppo_rows(work, sizes["ppo"], gpu and not args.smoke, args.timeout)
    by_name = {row["row"]: row for row in rows}
    memory = (by_name["ppo-lora"]["peak_gpu_mb"] / by_name["ppo"]["peak_gpu_mb"]
              if by_name["ppo"].get("peak_gpu_mb") else None)
    summary = {"smoke": args.smoke, "date": began.strftime("%Y-%m-%d %H:%M UTC"), "device": rows[0]["device"],
               "rows": rows, "sizes": sizes,
               "ratios": {"ppo_speedup": by_name["ppo"]["sequences_per_s"] / by_name["ppo-padded"]["sequences_per_s"],
                          "lora_memory": memory}}
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=2)
    with open(args.md, "w") as f:
        f.write(table(summary))
    print(table(summary))
    base.say(f"wrote {args.md} and {args.json}")


if __name__ == "__main__":
    main()
