"""`make bench`, PPO: the pipeline's PPOTrainer against TRL 1.12's, on the same models, prompts and config.

    python bench/ppo_vs_trl112.py            # 3 seeds each: recipes/tiny's models and PPO recipe
    python bench/ppo_vs_trl112.py --quick    # a smoke run: 1 seed, tiny models and sizes (a few minutes)

Writes a section into bench/results/ppo.md and the raw figures into bench/results/ppo.json
(--md / --json to choose; in a Markdown file that already holds the section, only the section is replaced).

TRL deleted its PPOTrainer in 1.13; `pipeline/trainers/ppo.py` keeps TRL 1.12's algorithm and config field
names on transformers' Trainer. This script compares the two:

* TRL 1.12 lives in its own virtual environment, bench/.venv-trl112 (made once and reused: `python -m venv`,
  torch==2.13.0, then trl==1.12.0 with the main environment's transformers, accelerate, datasets and peft
  versions); --trl112-python uses another one instead.
* Models: the SFT policy and the reward model of recipes/tiny's pretrain, sft and reward stages, run once into
  the work folder (`python -m pipeline run ... --stages pretrain,sft,reward`); --reuse-outputs takes
  outputs/tiny's instead. --quick trains them with the tests' tiny settings (tests/conftest.py).
* Data: the PPO recipe's prompts (`embedded:prompt`, train split), loaded and tokenized in the main environment
  exactly as the PPO stage does (`pipeline/stages/ppo.py: tokenize_prompts`), saved to disk; TRL 1.12's run
  loads those input_ids, and ours checks that the stage tokenized the same ones.
* Config: recipes/tiny/ppo.yaml (with --quick: smaller batches, episodes and responses), `report_to: none`,
  `save_strategy: no`; its PPOConfig fields go to both trainers (TRL 1.12's run takes the recipe keys that are
  fields of its PPOConfig).
* Runs: ours is the pipeline's PPO stage (`bench/ours_ppo.py`: `pipeline.stages.run("ppo", ...)`, what
  scripts/ppo.py does); TRL 1.12's is `bench/trl112_ppo.py` (TRL's PPO example: PPOTrainer, train, save). Each
  run is its own process, interleaved (ours, 1.12, 1.12, ours, ours, 1.12) with seeds 42, 43, 44. Measured:
  episodes/s over the `train()` call, the process's peak RSS at the end of `train()`, and the time split of
  `train()` into generation, scoring forward passes and PPO epochs.
* Quality: every trained policy is then evaluated alike here: `pipeline.evaluate.compare_policies` against
  the SFT policy on the held-out prompts (the test split), 4 samples per prompt, the run's seed, the learned
  reward model and the gold oracle (`pipeline.embedded.gold_score`).
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import yaml  # noqa: E402

BENCH = os.path.join(ROOT, "bench")
RECIPES = os.path.join(ROOT, "recipes", "tiny")
DEFAULT_VENV = os.path.join(BENCH, ".venv-trl112")
TRL112 = "1.12.0"
TORCH = "torch==2.13.0"  # the CPU wheel on this machine's disk (no CUDA download)
SHARED = ("transformers", "accelerate", "datasets", "peft")  # pinned to the main environment's versions
# installed in the main environment (a dev extra) but not in TRL 1.12's: accelerate imports deepspeed on the first
# `unwrap_model` whenever it is installed (about 20 MB of RSS), so ours' run hides it when TRL 1.12's lacks it
OPTIONAL = ("deepspeed",)
SEEDS = (42, 43, 44)
IMPLS = {"ours": "ours (pipeline/trainers/ppo.py)", "trl112": "TRL 1.12 (trl.experimental.ppo)"}
MARK_START, MARK_END = "<!-- bench/ppo_vs_trl112.py: start -->", "<!-- bench/ppo_vs_trl112.py: end -->"

# --quick: the models of the tests' tiny settings (tests/conftest.py TINY_OVERRIDES, copied: pretrain, sft, reward)
QUICK_MODELS = {
    "pretrain": {"vocab_size": 400, "n_layer": 1, "n_embd": 32, "n_head": 2, "max_steps": 15, "max_length": 64,
                 "per_device_eval_batch_size": 64, "logging_steps": 2},
    "sft": {"max_steps": 10, "max_length": 64, "logging_steps": 2},
    "reward": {"max_steps": 10, "max_length": 64, "logging_steps": 2},
}
# --quick: the tests' tiny PPO sizes (4 updates of 16 episodes, 16-token responses)
QUICK_PPO = {"total_episodes": 64, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
             "response_length": 16}
# targets
QUALITY = ("gold_score_ppo", "gold_win_rate_vs_sft")  # ours' median within TRL 1.12's seed spread, or better
SPEED_TARGET, MEMORY_TARGET = 2.5, 1.05  # ours / TRL 1.12: episodes/s at least, peak RSS at most
QUIET = 0.25  # cores used by other processes that still count as a quiet machine (and an undisturbed run)
STARTED = time.perf_counter()


def settings(quick: bool) -> dict:
    """--quick waits for nobody and measures nothing again: its figures mean nothing anyway."""
    if quick:
        return {"mode": "quick", "seeds": list(SEEDS[:1]), "models": QUICK_MODELS, "ppo": QUICK_PPO,
                "eval_prompts": 16, "samples_per_prompt": 4, "timeout_s": 900,
                "wait_for_quiet_s": 0, "wait_budget_s": 0, "retry_budget_s": 0}
    return {"mode": "full", "seeds": list(SEEDS), "models": {}, "ppo": {}, "eval_prompts": None,
            "samples_per_prompt": 4, "timeout_s": 3600,
            "wait_for_quiet_s": 30, "wait_budget_s": 300, "retry_budget_s": 600}


def say(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {message}", flush=True)


# ---------------------------------------------------------------------------------------- the TRL 1.12 venv

def requirements() -> list[str]:
    """What the TRL 1.12 environment gets: torch, TRL 1.12, and the main environment's versions of the rest."""
    return [TORCH, f"trl=={TRL112}"] + [f"{p}=={importlib.metadata.version(p)}" for p in SHARED]


def ensure_venv(path: str) -> str:
    """The TRL 1.12 virtual environment at `path`, made once (a stamp file records what was installed) and
    reused; made again over an existing one when the main environment's versions moved."""
    python = os.path.join(path, "bin", "python")
    stamp = os.path.join(path, "bench-requirements.txt")
    wanted = requirements()
    if os.path.isfile(python) and os.path.isfile(stamp) and open(stamp).read().split() == wanted:
        return python
    shown = os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
    say(f"making the TRL 1.12 environment {shown} (once, a few minutes): {' '.join(wanted)}")
    if not os.path.isfile(python):
        subprocess.check_call([sys.executable, "-m", "venv", path])
    pip = [python, "-m", "pip", "install", "--quiet"]
    subprocess.check_call(pip + [wanted[0]])  # torch first, from its own wheel
    subprocess.check_call(pip + wanted[1:])
    subprocess.check_call([python, "-c", "import trl.experimental.ppo"], env=worker_env())
    with open(stamp, "w") as f:
        f.write("\n".join(wanted) + "\n")
    return python


def versions_of(python: str) -> dict:
    code = ("import importlib.metadata as m, json, platform\n"
            "out = {'python': platform.python_version()}\n"
            "for p in ('torch', 'transformers', 'trl', 'accelerate', 'datasets', 'peft', 'deepspeed'):\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    return json.loads(subprocess.check_output([python, "-c", code], env=worker_env(), text=True))


def worker_env() -> dict:
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # the TRL 1.12 run must not see this checkout's packages
    return env


# ---------------------------------------------------------------------------------------- models and data

def make_models(work: str, s: dict, reuse_outputs: bool) -> dict:
    """The SFT policy and the reward model: outputs/tiny's, or recipes/tiny's stages run into `work/models`
    (skipped by the pipeline's runner when a previous run of the same recipes in the same --workdir finished)."""
    if reuse_outputs:
        demo = os.path.join(ROOT, "outputs", "tiny")
        models = {"sft": os.path.join(demo, "sft"), "reward": os.path.join(demo, "reward"),
                  "source": "outputs/tiny/sft and outputs/tiny/reward (--reuse-outputs)"}
        for stage in ("sft", "reward"):
            if not os.path.isfile(os.path.join(models[stage], "model.safetensors")):
                raise SystemExit(f"--reuse-outputs: {models[stage]} has no model (run `make demo` first)")
        return models
    recipes, outputs = os.path.join(work, "model-recipes"), os.path.join(work, "models")
    os.makedirs(recipes, exist_ok=True)
    for stage in ("pretrain", "sft", "reward"):
        recipe = yaml.safe_load(open(os.path.join(RECIPES, f"{stage}.yaml")))
        recipe.update(s["models"].get(stage, {}), disable_tqdm=True, output_dir=os.path.join(outputs, stage))
        if "model_name_or_path" in recipe:
            recipe["model_name_or_path"] = os.path.join(outputs, os.path.basename(recipe["model_name_or_path"]))
        with open(os.path.join(recipes, f"{stage}.yaml"), "w") as f:
            yaml.safe_dump(recipe, f)
    log = os.path.join(work, "logs", "models.log")
    say(f"training the models: recipes/tiny pretrain, sft, reward{' (tiny test settings)' if s['models'] else ''}"
        f" -> {outputs}")
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, "-m", "pipeline", "run", recipes, "--stages", "pretrain,sft,reward",
                                "--skip_eval"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"making the models failed (exit {code}); {log} (tail):\n{open(log).read()[-4000:]}")
    source = ("recipes/tiny pretrain, sft, reward with the tests' tiny settings (tests/conftest.py)"
              if s["models"] else "recipes/tiny pretrain, sft, reward, run once for this benchmark")
    return {"sft": os.path.join(outputs, "sft"), "reward": os.path.join(outputs, "reward"), "source": source}


def base_recipe(models: dict, s: dict) -> dict:
    """recipes/tiny/ppo.yaml as both implementations run it (before the per-run seed and output folder)."""
    recipe = yaml.safe_load(open(os.path.join(RECIPES, "ppo.yaml")))
    recipe.update(s["ppo"])
    recipe.update(sft_model_path=models["sft"], reward_model_path=models["reward"], save_strategy="no",
                  report_to="none", disable_tqdm=True,
                  # the stage's own evaluation, cut to nothing: every policy is evaluated alike afterwards
                  eval_max_prompts=1, eval_samples_per_prompt=1)
    return recipe


def prepare_data(work: str, recipe: dict) -> dict:
    """The PPO stage's prompts, loaded and tokenized as the stage does, in a child process: this process must
    stay small, since a child's ru_maxrss starts from its parent's RSS at the fork (Linux keeps the high-water
    mark across fork and exec), and the runs are children of this process."""
    path = os.path.join(work, "recipes", "ppo-data.yaml")
    out = os.path.join(work, "data", "prompts.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(dict(recipe, output_dir=os.path.join(work, "runs", "unused")), f)
    subprocess.check_call([sys.executable, os.path.abspath(__file__), "--prepare-data", path, out], cwd=ROOT)
    with open(out) as f:
        return json.load(f)


def prepare_data_here(path: str, out_file: str) -> None:
    """The child of prepare_data: same recipe parsing, data loading and `tokenize_prompts` as the PPO stage;
    the tokenized prompts saved to disk for TRL 1.12's run, the held-out prompts kept for the evaluation."""
    import datasets

    from pipeline import data
    from pipeline.config import parse
    from pipeline.models import load_tokenizer
    from pipeline.stages.ppo import tokenize_prompts

    datasets.disable_progress_bars()
    work = os.path.dirname(os.path.dirname(out_file))
    script_args, training_args, model_args = parse("ppo", ["--config", path])
    prompts, eval_prompts, source = data.load_for("prompt", script_args)
    tokenizer = load_tokenizer(training_args.sft_model_path, model_args, padding_side="left")
    train = tokenize_prompts(prompts, tokenizer, script_args.max_prompt_length, source)
    held_out = eval_prompts if eval_prompts is not None else prompts
    tokenized_eval = tokenize_prompts(held_out, tokenizer, script_args.max_prompt_length, source)
    out = {"train": os.path.join(work, "data", "prompts-train"), "eval": os.path.join(work, "data", "prompts-eval")}
    train.save_to_disk(out["train"])
    tokenized_eval.save_to_disk(out["eval"])
    lengths = [len(ids) for ids in train["input_ids"]]
    with open(out_file, "w") as f:
        json.dump({**out, "source": source, "train_prompts": len(train), "eval_split_prompts": len(held_out),
                   "held_out": list(held_out["prompt"]), "prompt_tokens": {"min": min(lengths), "max": max(lengths)},
                   "max_prompt_length": script_args.max_prompt_length}, f)


# ---------------------------------------------------------------------------------------------------- runs

def cpu_busy_s() -> float:
    values = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def busy_cores(seconds: float) -> float:
    """Cores the machine keeps busy over the next `seconds` (nothing of ours runs meanwhile)."""
    before = cpu_busy_s()
    time.sleep(seconds)
    return (cpu_busy_s() - before) / seconds


class Gate:
    """Before a run, wait (up to `per_run_s`, and `budget_s` in all) for the other processes on the machine to
    leave the CPU; after it, allow a disturbed run to be measured again within `retry_budget_s` in all."""

    def __init__(self, per_run_s: float, budget_s: float, retry_budget_s: float):
        self.per_run_s, self.budget_s, self.retry_budget_s = per_run_s, budget_s, retry_budget_s
        self.waited_s = self.retried_s = 0.0

    def wait(self) -> float:
        start = time.perf_counter()
        while self.per_run_s > 0 and busy_cores(0.5) >= QUIET:
            waited = time.perf_counter() - start
            if waited >= self.per_run_s or self.waited_s + waited >= self.budget_s:
                break
            time.sleep(1.5)
        waited = time.perf_counter() - start
        self.waited_s += waited
        return waited

    def may_retry(self, cost_s: float) -> bool:
        if self.retried_s + cost_s > self.retry_budget_s:
            return False
        self.retried_s += cost_s
        return True


def measured_run(gate: Gate, *args) -> dict:
    """run_one after waiting for a quiet machine; measured again (once) if other processes shared the CPU."""
    discarded = []
    while True:
        waited = gate.wait()
        result = run_one(*args)
        result["waited_for_quiet_s"] = waited
        if result["other_load_cores"] < QUIET or len(discarded) >= 1 or not gate.may_retry(result["process_wall_s"]):
            break
        discarded.append({k: result[k] for k in ("other_load_cores", "episodes_per_s", "peak_rss_mb", "train_s")})
        say(f"{result['impl']:6s} seed {result['seed']}: disturbed (other load {result['other_load_cores']:.2f} "
            "cores), measuring again")
    result["disturbed_runs_discarded"] = discarded
    return result


def run_worker(gate: Gate, script: str, name: str, spec: dict, work: str) -> dict:
    """`script --worker <spec file>` in a process of its own, after waiting for a quiet machine: the result file
    it wrote (spec["result_file"], set here), with the wait and the other processes' CPU use meanwhile (bench/group.py
    and bench/reward_long.py)."""
    result_file, log, spec_file = (os.path.join(work, f"{name}.{ext}") for ext in ("json", "log", "spec.json"))
    with open(spec_file, "w") as f:
        json.dump(dict(spec, result_file=result_file), f)
    waited = gate.wait()
    busy, children, start = cpu_busy_s(), children_cpu_s(), time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, os.path.abspath(script), "--worker", spec_file], cwd=ROOT, stdout=f,
                               stderr=subprocess.STDOUT, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{name} failed ({code}); {log} (tail):\n{open(log).read()[-4000:]}")
    result = json.load(open(result_file))
    own = children_cpu_s() - children
    result.update(waited_for_quiet_s=waited, other_load_cores=max(0.0, (cpu_busy_s() - busy - own) / wall))
    return result


def run_one(impl: str, seed: int, recipe: dict, work: str, data: dict, python112: str, timeout: float,
            hide: list) -> dict:
    """One training run in its own process; its measurements, and the other processes' CPU use meanwhile."""
    name = f"{impl}-{seed}"
    run = dict(recipe, seed=seed, output_dir=os.path.join(work, "runs", name))
    result_file = os.path.join(work, "results", f"{name}.json")
    log = os.path.join(work, "logs", f"{name}.log")
    os.makedirs(os.path.dirname(result_file), exist_ok=True)
    shutil.rmtree(run["output_dir"], ignore_errors=True)  # a fresh run (not a resume), also when measured again
    if os.path.exists(result_file):
        os.remove(result_file)
    if impl == "ours":
        recipe_file = os.path.join(work, "recipes", f"{name}.yaml")
        with open(recipe_file, "w") as f:
            yaml.safe_dump(run, f)
        command = [sys.executable, os.path.join(BENCH, "ours_ppo.py"), "--recipe", recipe_file,
                   "--data", data["train"], "--result", result_file, *[f"--hide={p}" for p in hide]]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    else:
        config_file = os.path.join(work, "recipes", f"{name}.json")
        with open(config_file, "w") as f:
            json.dump(run, f, indent=2)
        command = [python112, os.path.join(BENCH, "trl112_ppo.py"), "--config", config_file,
                   "--data", data["train"], "--eval-data", data["eval"], "--result", result_file]
        env = worker_env()
    busy, children, start = cpu_busy_s(), children_cpu_s(), time.perf_counter()
    with open(log, "w") as f:
        try:
            code = subprocess.call(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            code = f"timed out after {timeout:.0f} s"
    wall = time.perf_counter() - start
    if code != 0 or not os.path.isfile(result_file):
        raise SystemExit(f"{name} failed ({code}); {log} (tail):\n{open(log).read()[-4000:]}")
    with open(result_file) as f:
        result = json.load(f)
    own = children_cpu_s() - children
    # the floor of the child's ru_maxrss (this process's RSS when it forked): must stay below the runs' own peak
    result["parent_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.update(process_wall_s=wall, other_load_cores=max(0.0, (cpu_busy_s() - busy - own) / wall), log=log)
    return result


def evaluate(runs: list, models: dict, data: dict, recipe: dict, s: dict) -> dict:
    """Every trained policy against the SFT policy, alike: compare_policies on the held-out prompts (in this
    process, after the last run)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline import embedded
    from pipeline.evaluate import compare_policies
    from pipeline.models import fit_to_tokenizer, load_tokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tokenizer = load_tokenizer(models["sft"], padding_side="left")
    sft = fit_to_tokenizer(AutoModelForCausalLM.from_pretrained(models["sft"]), tokenizer).eval()
    reward = fit_to_tokenizer(AutoModelForSequenceClassification.from_pretrained(models["reward"], num_labels=1),
                              tokenizer).eval()
    prompts = data["held_out"][: s["eval_prompts"]]
    for run in runs:
        policy = fit_to_tokenizer(AutoModelForCausalLM.from_pretrained(run["policy"]), tokenizer).eval()
        start = time.perf_counter()
        metrics = compare_policies(policy, sft, reward, tokenizer, prompts, max_new_tokens=recipe["response_length"],
                                   temperature=recipe["temperature"], oracle=embedded.gold_score,
                                   samples_per_prompt=s["samples_per_prompt"], seed=run["seed"])
        run["eval"] = {k: v for k, v in metrics.items() if k != "samples"}
        run["eval_samples"] = metrics["samples"][:3]
        say(f"evaluated {run['impl']:6s} seed {run['seed']}: gold {run['eval']['gold_score_ppo']:+.3f} (SFT "
            f"{run['eval']['gold_score_sft']:+.3f}), win rate {run['eval']['gold_win_rate_vs_sft']:.3f}, KL "
            f"{run['eval']['kl_to_sft']:.2f} ({time.perf_counter() - start:.1f} s)")
    config = sft.config
    return {"prompts": len(prompts), "samples_per_prompt": s["samples_per_prompt"],
            "parameters": sft.num_parameters(),
            "model_config": {k: getattr(config, k, None) for k in ("model_type", "n_layer", "n_head", "n_embd",
                                                                   "n_positions", "vocab_size")}}


# -------------------------------------------------------------------------------------------------- summary

def stat(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def paired(a: list, b: list) -> dict:
    """Per-seed ratios a[i] / b[i]: their median and spread."""
    ratios = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "paired": ratios}


METRICS = {  # key -> (label, how to read it from a run)
    "gold_score_ppo": ("gold score (oracle, held-out)", lambda r: r["eval"]["gold_score_ppo"]),
    "gold_win_rate_vs_sft": ("gold win rate vs SFT", lambda r: r["eval"]["gold_win_rate_vs_sft"]),
    "kl_to_sft": ("KL to SFT (per response)", lambda r: r["eval"]["kl_to_sft"]),
    "rm_score_ppo": ("reward-model score", lambda r: r["eval"]["rm_score_ppo"]),
    "rm_win_rate_vs_sft": ("reward-model win rate vs SFT", lambda r: r["eval"]["rm_win_rate_vs_sft"]),
    "eos_rate_ppo": ("responses ending with EOS", lambda r: r["eval"]["eos_rate_ppo"]),
    "episodes_per_s": ("episodes/s (train() call)", lambda r: r["episodes_per_s"]),
    "peak_rss_mb": ("peak RSS MB (end of train())", lambda r: r["peak_rss_mb"]),
    "rss_after_imports_mb": ("RSS MB once imported (before loading)", lambda r: r["rss_after_imports_mb"]),
    "train_s": ("train() s", lambda r: r["train_s"]),
    "generation_pct": ("time: generation %", lambda r: 100 * r["split_s"]["generation"] / r["train_s"]),
    "scoring_pct": ("time: scoring forward passes %", lambda r: 100 * r["split_s"]["scoring"] / r["train_s"]),
    "ppo_epochs_pct": ("time: PPO epochs %", lambda r: 100 * r["split_s"]["ppo_epochs"] / r["train_s"]),
    "training_scores": ("training RM score (mean over updates)", lambda r: r["logged"].get("objective/scores")),
    "setup_s": ("setup s (start to train())", lambda r: r["setup_s"]),
    "other_load_cores": ("other processes' CPU use (cores)", lambda r: r["other_load_cores"]),
}
DIFFERENCE_NOTES = {"ddp_find_unused_parameters": "only read under DDP; ours sets it for its policy + value wrapper"}
IGNORED_ARGS = {"output_dir", "logging_dir", "run_name", "sft_model_path", "reward_model_path",
                "max_steps"}  # max_steps: ours derives the Trainer's step budget from the PPO sizes


def config_differences(ours: dict, trl: dict) -> list:
    """TrainingArguments/PPOConfig fields both trainers have whose values differ in the runs."""
    return sorted(k for k in set(ours) & set(trl) if k not in IGNORED_ARGS and ours[k] != trl[k])


def summarise(info: dict, runs: list) -> dict:
    by_impl = {impl: sorted((r for r in runs if r["impl"] == impl), key=lambda r: r["seed"]) for impl in IMPLS}
    rows = {impl: {key: stat([read(r) for r in results]) for key, (_, read) in METRICS.items()
                   if all(read(r) is not None for r in results)}
            for impl, results in by_impl.items()}
    sft_gold = stat([r["eval"]["gold_score_sft"] for r in by_impl["ours"]])
    ours, trl = by_impl["ours"], by_impl["trl112"]
    ratios = {"episodes_per_s": paired([r["episodes_per_s"] for r in ours], [r["episodes_per_s"] for r in trl]),
              "peak_rss_mb": paired([r["peak_rss_mb"] for r in ours], [r["peak_rss_mb"] for r in trl])}
    targets = []
    for key in QUALITY:
        mine, theirs = rows["ours"][key], rows["trl112"][key]
        targets.append({"target": f"{METRICS[key][0]}: ours within TRL 1.12's seed spread or better",
                        "key": key, "ours": mine["median"], "trl112_min": theirs["min"],
                        "trl112_max": theirs["max"], "met": mine["median"] >= theirs["min"]})
    r = ratios["episodes_per_s"]
    targets.append({"target": f"episodes/s: ours / TRL 1.12 >= {SPEED_TARGET}x", "key": "episodes_per_s",
                    "ratio": r, "met": r["median"] >= SPEED_TARGET})
    r = ratios["peak_rss_mb"]
    targets.append({"target": f"peak memory (RSS): ours / TRL 1.12 <= {MEMORY_TARGET}x", "key": "peak_rss_mb",
                    "ratio": r, "met": r["median"] <= MEMORY_TARGET})
    differences = sorted({k for a, b in zip(ours, trl) for k in config_differences(a["args"], b["args"])})
    return {**info, "rows": rows, "sft_gold_score": sft_gold, "ratios": ratios, "targets": targets,
            "config_differences": {k: {"ours": ours[0]["args"].get(k), "trl112": trl[0]["args"].get(k)}
                                   for k in differences},
            "same_episodes": all(a["episodes"] == b["episodes"] for a, b in zip(ours, trl)),
            "same_prompts": all(r.get("same_prompts_as_data_file") for r in ours),
            "runs": runs}


# ------------------------------------------------------------------------------------------------- markdown

def _n(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 1 or x == 0 else f"{x:.3f}"


def _range(a: float, b: float) -> str:
    return f"{_n(a)} – {_n(b)}" if min(a, b) < 0 else f"{_n(a)}–{_n(b)}"


def _spread(st: dict) -> str:
    return _n(st["median"]) if st["min"] == st["max"] else f"{_n(st['median'])} ({_range(st['min'], st['max'])})"


def _ratio(r: dict) -> str:
    if r["min"] == r["max"]:
        return f"{r['median']:.2f}×"
    return f"{r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})"


def _verdict(t: dict) -> str:
    if t["met"]:
        return "**met**"
    if "ratio" in t and t["ratio"]["min"] <= (SPEED_TARGET if t["key"] == "episodes_per_s" else MEMORY_TARGET) \
            <= t["ratio"]["max"]:
        return "**not met** (the per-seed ratios straddle the target)"
    return "**not met**"


def tables(summary: dict) -> list:
    """The targets, the ratios and one table per implementation: what the script prints too."""
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for t in summary["targets"]:
        if "ratio" in t:
            measured = f"{_ratio(t['ratio'])} (median of the per-seed ratios, min–max)"
        else:
            theirs = _n(t["trl112_min"]) if t["trl112_min"] == t["trl112_max"] else \
                _range(t["trl112_min"], t["trl112_max"])
            measured = f"ours {_n(t['ours'])} (median) vs TRL 1.12 {theirs}"
        lines.append(f"| {t['target']} | {measured} | {_verdict(t)} |")
    lines += ["", "| ours / TRL 1.12, paired by seed | median (min–max) | per seed |", "|---|---|---|"]
    seeds = summary["settings"]["seeds"]
    for key, r in summary["ratios"].items():
        lines.append(f"| {METRICS[key][0]} | {_ratio(r)} | "
                     + ", ".join(f"{s}: {x:.2f}×" for s, x in zip(seeds, r["paired"])) + " |")
    for impl, label in IMPLS.items():
        rows = summary["rows"][impl]
        lines += ["", f"**{label}**", "",
                  "| metric | median | min–max | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|---|---|" + "---|" * len(seeds)]
        for key, st in rows.items():
            lines.append(f"| {METRICS[key][0]} | {_n(st['median'])} | {_range(st['min'], st['max'])} | "
                         + " | ".join(_n(v) for v in st["values"]) + " |")
    return lines


def section(summary: dict) -> str:
    s, m, ev, data = summary["settings"], summary["machine"], summary["evaluation"], summary["data"]
    v_main, v112 = summary["versions"]["main"], summary["versions"]["trl112"]
    recipe = summary["recipe"]
    quick = s["mode"] == "quick"
    runs = summary["runs"]
    lines = [MARK_START, "## PPO: ours vs TRL 1.12", ""]
    add = lines.append
    add(f"Generated by `python bench/ppo_vs_trl112.py{' --quick' if quick else ''}` (`make bench` runs it after "
        f"`bench/run.py`) on {summary['date']}, in {summary['bench_wall_s']:.0f} s; the raw figures of every run "
        f"are in [`{summary['json_name']}`]({summary['json_name']}). Do not edit by hand: rerun.")
    add("")
    if quick:
        add("**This is a `--quick` smoke run (1 seed, tiny models, 4 updates): the figures mean nothing.**")
        add("")
    add("TRL deleted its `PPOTrainer` in 1.13; the pipeline's `PPOTrainer` (`pipeline/trainers/ppo.py`) keeps TRL "
        "1.12's algorithm and config field names on transformers' `Trainer`. Here the two train the same SFT "
        "policy against the same reward model on the same tokenized prompts with the same PPOConfig fields, "
        f"{len(s['seeds'])} seed{'s' if len(s['seeds']) > 1 else ''} each ({', '.join(map(str, s['seeds']))}), "
        "every run its own process, interleaved (ours, 1.12, 1.12, ours, ...) so that the machine's drift hits "
        "both alike. A cell is the median over the seeds with the spread (min–max); a ratio is the median of the "
        "per-seed ratios (same seed), with their min–max.")
    add("")
    add(f"*Ours* is the pipeline's PPO stage, `pipeline.stages.run(\"ppo\", [\"--config\", recipe])` (what "
        "`scripts/ppo.py` runs: it loads and checks the prompts, tokenizes them, loads the models, trains, "
        "evaluates, saves; `bench/ours_ppo.py`), with its own evaluation cut to 1 prompt. *TRL 1.12* is "
        "`bench/trl112_ppo.py` in a separate virtual environment: TRL's PPO example (tokenizer with left "
        "padding, policy and reference `AutoModelForCausalLM`, reward and value "
        "`AutoModelForSequenceClassification` with 1 label, `PPOTrainer(...)`, `train()`, `save_model()`), after "
        "`transformers.set_seed(seed)` as the stage does; it trains on the prompts the main environment tokenized "
        "with the stage's own `tokenize_prompts` and saved to disk"
        + (" (ours checked that its stage tokenized the same ones)" if summary["same_prompts"] else
           " (**ours' stage tokenized different ones**)") + ".")
    add("")
    add("*episodes/s*: episodes trained (updates × episodes per update"
        + (", the same for both" if summary["same_episodes"] else ", **not the same for both**")
        + ") per second of the `train()` call alone. *peak RSS*: the process's high-water mark (`ru_maxrss`) "
        "read as `train()` returns: imports, data, the four models and training (not the save, nor ours' "
        "evaluation). *time split* of `train()`: *generation* is `pipeline.rollout.generate` (ours) / "
        "`batch_generation` (TRL 1.12); *scoring* the rollout's forward passes of the reference, value and reward "
        "models: ours `PPOTrainer._make_rollouts` minus its generation (so it also holds the rewards, advantages "
        "and masks, a few ms), TRL 1.12 its module-level `forward` without gradients plus `get_reward` "
        f"(reference {_pct(runs, 'reference')}, value {_pct(runs, 'value')}, reward {_pct(runs, 'reward')} of "
        "its `train()`, medians); *PPO epochs* is the rest of `train()` (the epochs' forward and backward passes "
        "and optimizer steps, plus the loop's own work). Timed by wrapping those functions inside each run's "
        "process; neither library's files are touched.")
    add("")
    add(f"*Quality*: after training, each saved policy is evaluated the same way in the main environment: "
        f"`pipeline.evaluate.compare_policies` against the SFT policy on {ev['prompts']} held-out prompts "
        f"(`{data['source']}`, test split{'' if s['eval_prompts'] is None else ', the first ' + str(ev['prompts'])})"
        f" × {ev['samples_per_prompt']} samples, {recipe['response_length']} new tokens at temperature "
        f"{recipe['temperature']}, seeded with the run's seed (the SFT policy answers with the same seed): "
        "*gold score* and *gold win rate vs SFT* by the embedded task's oracle (`pipeline.embedded.gold_score`, "
        "never seen in training), *reward-model score* by the learned reward model, *KL to SFT* the mean "
        "summed log-ratio of the policy's own samples. The SFT policy's gold score on the same prompts: "
        f"{_spread(summary['sft_gold_score'])}.")
    add("")
    add("### Results")
    add("")
    lines.extend(tables(summary))
    add("")
    points = [p for p in runs[0]["peak_rss_mb_at"] if all(p in r["peak_rss_mb_at"] for r in runs)]
    add("Where the peak RSS is reached: the high-water mark at points of a run (MB, median over the seeds; "
        "*imported*: the libraries imported, for ours when the stage's `main` starts; *data and models "
        "loaded*: when the trainer is constructed):")
    add("")
    add("| | " + " | ".join(points) + " |")
    add("|---|" + "---|" * len(points))
    for impl, label in IMPLS.items():
        mine = [r for r in runs if r["impl"] == impl]
        add(f"| {label} | " + " | ".join(_n(statistics.median(r["peak_rss_mb_at"][p] for r in mine))
                                         for p in points) + " |")
    add("")
    loads = [r["other_load_cores"] for r in runs]
    discarded = sum(len(r.get("disturbed_runs_discarded", [])) for r in runs)
    add(f"Other processes' CPU use during the runs (the machine's busy time minus the run's own): median "
        f"{statistics.median(loads):.2f} cores, max {max(loads):.2f}; {sum(x >= QUIET for x in loads)} of "
        f"{len(loads)} runs shared the CPU with more than {QUIET} cores of other work. Before each run the script "
        f"waited for a quiet machine ({summary.get('waited_for_quiet_s', 0):.0f} s in all) and measured "
        f"{discarded} disturbed run{'s' if discarded != 1 else ''} again (those figures are discarded; "
        f"{summary.get('retried_s', 0):.0f} s). On a 2-core machine one busy process beside a run slows it "
        "several-fold (torch's threads wait for a core that is taken), so a run with a high figure there does "
        "not compare.")
    add("")
    add("### Machine, software, config")
    add("")
    add("| | |")
    add("|---|---|")
    add(f"| CPU | {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable"
        + (f"; cgroup cpu.max `{m['cgroup_cpu_max']}`" if m.get("cgroup_cpu_max") else "") + f"), torch threads "
        f"{runs[0]['torch_threads']} |")
    add(f"| memory | {m['memory_gib']} GiB |")
    add("| GPU | none |")
    add(f"| ours | Python {v_main['python']}, torch {v_main['torch']}, transformers {v_main['transformers']}, trl "
        f"{v_main['trl']}, accelerate {v_main['accelerate']}, datasets {v_main['datasets']}, peft {v_main['peft']} "
        "(`.venv`) |")
    add(f"| TRL 1.12 | Python {v112['python']}, torch {v112['torch']}, transformers {v112['transformers']}, trl "
        f"{v112['trl']}, accelerate {v112['accelerate']}, datasets {v112['datasets']}, peft {v112['peft']} "
        f"(`{summary['trl112_python']}`) |")
    mc = ev["model_config"]
    add(f"| models | {summary['models']['source']}: GPT-2, {mc['n_layer']} layer{'s' if mc['n_layer'] != 1 else ''},"
        f" {mc['n_head']} heads, width {mc['n_embd']}, vocabulary {mc['vocab_size']}, "
        f"{ev['parameters'] / 1e6:.2f}M parameters per model; attention `{runs[0]['attn_implementation']}` |")
    add(f"| prompts | {data['train_prompts']} training prompts of `{data['source']}` (train split), "
        f"{data['prompt_tokens']['min']}–{data['prompt_tokens']['max']} tokens through the chat template "
        f"(max_prompt_length {data['max_prompt_length']}) |")
    add(f"| updates | {runs[0]['updates']} per run of {recipe['per_device_train_batch_size']} × "
        f"{recipe['gradient_accumulation_steps']} × {recipe.get('num_mini_batches', 1)} episodes, "
        f"{runs[0]['episodes']} episodes in all |")
    add("")
    add("The PPOConfig fields both trainers got (`recipes/tiny/ppo.yaml`"
        + (", with the --quick sizes: " + ", ".join(f"{k}: {v}" for k, v in s["ppo"].items()) if s["ppo"] else "")
        + "; the model paths and output folder per run left out):")
    add("")
    add("```yaml")
    shown = {k: v for k, v in recipe.items() if k not in summary["recipe_not_ppo_config"]
             and k not in ("sft_model_path", "reward_model_path", "output_dir")}
    lines.extend(yaml.safe_dump(shown, sort_keys=False).rstrip().splitlines())
    add("```")
    add("")
    add("Recipe keys that are not PPOConfig fields (the stage's script arguments; TRL 1.12's run ignores them): "
        + ", ".join(f"`{k}`" for k in summary["recipe_not_ppo_config"]) + ".")
    add("")
    diffs = summary["config_differences"]
    add("TrainingArguments / PPOConfig fields whose values differ between the two runs of a seed (as each trainer "
        "holds them after `train()`; paths, run names and `max_steps`, which ours derives from the PPO sizes for "
        "the Trainer's loop, left out): "
        + ("none" if not diffs else "; ".join(
            f"`{k}` ours {d['ours']!r}, TRL 1.12 {d['trl112']!r}"
            + (f" ({DIFFERENCE_NOTES[k]})" if k in DIFFERENCE_NOTES else "") for k, d in diffs.items())) + ".")
    add("")
    add("Known differences of the implementations, with these same fields: ours draws each epoch's prompt order "
        "from a generator seeded by `seed` alone (so that a resumed run replays it), TRL 1.12 from the global "
        "RNG, so the two see the prompts in different orders and sample different responses; ours' stage checks "
        "every gradient norm for NaN/inf. Neither clips the gradient norm (ours' `max_grad_norm` defaults to 0: "
        "the line above). " + schedule_note(summary["runs"]))
    add("")
    hidden = summary.get("hidden_from_ours") or []
    both = [p for p in OPTIONAL if v_main.get(p) and v112.get(p)]
    if hidden:
        add("Environments: " + ", ".join(f"`{p}` {v_main[p]}" for p in hidden) + " is installed in `.venv` (the "
            "dev extra) and not in the TRL 1.12 environment; accelerate imports deepspeed on the first "
            "`unwrap_model` whenever it is installed (about 20 MB of RSS, in either trainer), so ours' runs hide it "
            "(`bench/ours_ppo.py --hide`: `importlib.util.find_spec` finds nothing, as in an environment without "
            "it). Only the packages the two environments share are then visible to both.")
    elif both:
        add("Environments: both have " + ", ".join(f"`{p}`" for p in both) + ".")
    else:
        add("Environments: neither has " + ", ".join(f"`{p}`" for p in OPTIONAL) + ".")
    add("")
    add("### Reproduce")
    add("")
    add("```bash")
    add("make bench                                   # bench/run.py, then this script (3 seeds)")
    add(".venv/bin/python bench/ppo_vs_trl112.py --quick --md /tmp/p.md --json /tmp/p.json   # smoke run")
    add(".venv/bin/python bench/ppo_vs_trl112.py --from-json bench/results/ppo.json   # the Markdown again")
    add("```")
    add("")
    add("The first run makes `bench/.venv-trl112` (TRL 1.12 with the main environment's transformers, accelerate, "
        "datasets and peft) and reuses it afterwards; `--trl112-python PATH` uses another environment. "
        "`--reuse-outputs` takes `outputs/tiny/{sft,reward}` (a `make demo`) instead of training the models; "
        "`--workdir DIR` keeps the models, runs and logs (and reuses the models on the next run).")
    add(MARK_END)
    return "\n".join(lines) + "\n"


def schedule_note(runs: list) -> str:
    """How ours' runs moved the learning rate, against TRL 1.12's once per update (`lr_once_per_update`, which
    runs before 2026-12-07's change did not record: they moved it every optimizer step)."""
    ours = {r.get("lr_once_per_update", "unrecorded") for r in runs if r["impl"] == "ours"}
    if ours == {True}:
        return "Both move the learning rate once per update, over the updates."
    if ours == {"unrecorded"}:
        return ("In these runs ours moved the learning rate every optimizer step (over num_ppo_epochs x "
                "num_mini_batches x the updates), TRL 1.12 once per update (over the updates): within an update "
                "ours' rate was lower by less than the initial rate / the updates; ours now moves it once per "
                "update too.")
    return ("Ours' learning rate did not stay constant over every update (lr_once_per_update: "
            f"{sorted(ours, key=str)}); TRL 1.12 moves it once per update.")


def _pct(runs: list, part: str) -> str:
    values = [100 * r["split_s"][part] / r["train_s"] for r in runs if r["impl"] == "trl112"]
    return f"{statistics.median(values):.0f}%" if values else "n/a"


def write_markdown(path: str, text: str) -> None:
    """Replace the section in `path` (between its markers), or append it, or write a new file."""
    if os.path.isfile(path):
        old = open(path).read()
        if MARK_START in old and MARK_END in old:
            head, rest = old.split(MARK_START, 1)
            new = head + text.rstrip("\n") + rest.split(MARK_END, 1)[1]
        else:
            new = old.rstrip("\n") + "\n\n" + text
    else:
        new = "# Benchmarks: PPO\n\n" + text
    with open(path, "w") as f:
        f.write(new)


def json_link(md: str, js: str) -> str:
    """The JSON's path relative to the Markdown's folder (`ppo.json` beside `ppo.md`), for its link."""
    return os.path.relpath(os.path.abspath(js), os.path.dirname(os.path.abspath(md))).replace(os.sep, "/")


def padding_fraction(run: dict) -> float:
    """The share of the tokens a run's models computed in the scoring passes and PPO epochs that were padding."""
    return 1 - run["tokens"]["real"] / run["tokens"]["computed"]


def headline(summary: dict) -> dict:
    """The figures the PPO issue reads, first in the `tiny` entry: medians (ratios: of the per-seed ratios)."""
    rows = summary["rows"]
    return {"episodes_per_s_ratio": summary["ratios"]["episodes_per_s"]["median"],
            "gold_ours": rows["ours"]["gold_score_ppo"]["median"],
            "gold_trl112": rows["trl112"]["gold_score_ppo"]["median"],
            "gold_trl112_spread": [rows["trl112"]["gold_score_ppo"]["min"], rows["trl112"]["gold_score_ppo"]["max"]],
            "win_rate_ours": rows["ours"]["gold_win_rate_vs_sft"]["median"],
            "win_rate_trl112": rows["trl112"]["gold_win_rate_vs_sft"]["median"],
            "padding_fraction_ours": statistics.median(padding_fraction(r) for r in summary["runs"]
                                                       if r["impl"] == "ours"),
            "padding_fraction_trl112": statistics.median(padding_fraction(r) for r in summary["runs"]
                                                         if r["impl"] == "trl112")}


def write(summary: dict, md: str, js: str) -> None:
    """The `tiny` entry of the results JSON (bench/ppo_long.py writes `long`, bench/ppo_memory.py `memory_124m`)."""
    summary["json_name"] = json_link(md, js)
    results = json.load(open(js)) if os.path.isfile(js) else {}
    if "runs" in results:  # the layout before the entries: this benchmark's summary alone
        results = {}
    results["tiny"] = {**headline(summary), **summary}
    with open(js, "w") as f:
        json.dump(results, f, indent=2)
    write_markdown(md, section(summary))


# ----------------------------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, tiny models and sizes")
    parser.add_argument("--seeds", help="comma-separated seeds (default 42,43,44; 42 with --quick)")
    parser.add_argument("--md", default=os.path.join(ROOT, "bench", "results", "ppo.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "ppo.json"))
    parser.add_argument("--trl112-venv", default=DEFAULT_VENV,
                        help="the TRL 1.12 virtual environment, made there if missing (default bench/.venv-trl112)")
    parser.add_argument("--trl112-python", help="use this Python (with trl 1.12.0) instead of --trl112-venv's")
    parser.add_argument("--reuse-outputs", action="store_true",
                        help="take outputs/tiny/sft and outputs/tiny/reward instead of training the models")
    parser.add_argument("--workdir", help="keep the models, runs and logs here (default: a temporary folder, "
                                          "removed at the end); models already trained there are reused")
    parser.add_argument("--eval-prompts", type=int, help="held-out prompts to evaluate on (default all; 16 with "
                                                         "--quick)")
    parser.add_argument("--timeout", type=float, help="seconds per training run before it is killed")
    parser.add_argument("--wait-for-quiet", type=float,
                        help="before each run, wait up to this many seconds for other processes to leave the CPU "
                             "(default 30; 0 with --quick)")
    parser.add_argument("--retry-budget", type=float,
                        help="seconds in all of measuring again runs that shared the CPU with other processes "
                             "(default 600; 0 with --quick)")
    parser.add_argument("--from-json", metavar="JSON", help="measure nothing: write the Markdown section again "
                                                            "from a previous run's JSON")
    parser.add_argument("--prepare-data", nargs=2, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare_data:
        prepare_data_here(*args.prepare_data)
        return
    if args.from_json:
        with open(args.from_json) as f:
            summary = json.load(f)
        summary = summary.get("tiny", summary)
        summary["json_name"] = json_link(args.md, args.from_json)
        write_markdown(args.md, section(summary))
        print(f"wrote {args.md} from {args.from_json}")
        return

    s = settings(args.quick)
    if args.seeds:
        s["seeds"] = [int(x) for x in args.seeds.split(",")]
    if args.eval_prompts is not None:
        s["eval_prompts"] = args.eval_prompts
    if args.timeout:
        s["timeout_s"] = args.timeout
    if args.wait_for_quiet is not None:
        s["wait_for_quiet_s"] = args.wait_for_quiet
        s["wait_budget_s"] = max(s["wait_budget_s"], 10 * args.wait_for_quiet)
    if args.retry_budget is not None:
        s["retry_budget_s"] = args.retry_budget
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench-ppo-"))
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    began = datetime.datetime.now(datetime.timezone.utc)
    try:
        python112 = args.trl112_python or ensure_venv(os.path.abspath(args.trl112_venv))
        versions = {"main": versions_of(sys.executable), "trl112": versions_of(python112)}
        if versions["trl112"]["trl"] != TRL112:
            raise SystemExit(f"{python112} has trl {versions['trl112']['trl']}, not {TRL112}")
        for package in SHARED:
            if versions["trl112"][package] != versions["main"][package]:
                say(f"warning: {package} {versions['trl112'][package]} in the TRL 1.12 environment, "
                    f"{versions['main'][package]} in the main one")
        hide = [p for p in OPTIONAL if versions["main"].get(p) and not versions["trl112"].get(p)]
        say(f"TRL 1.12 environment: {python112}"
            + (f"; hidden from ours' runs, as TRL 1.12's environment lacks them: {', '.join(hide)}" if hide else ""))
        models = make_models(work, s, args.reuse_outputs)
        recipe = base_recipe(models, s)
        say("tokenizing the prompts as the PPO stage does")
        data = prepare_data(work, recipe)
        runs = []
        gate = Gate(s["wait_for_quiet_s"], s["wait_budget_s"], s["retry_budget_s"])
        for i, seed in enumerate(s["seeds"]):
            for impl in (("ours", "trl112") if i % 2 == 0 else ("trl112", "ours")):
                result = measured_run(gate, impl, seed, recipe, work, data, python112, s["timeout_s"], hide)
                split = result["split_s"]
                say(f"{impl:6s} seed {seed}: {result['episodes_per_s']:.1f} episodes/s ({result['episodes']} in "
                    f"{result['train_s']:.1f} s), peak RSS {result['peak_rss_mb']:.0f} MB, generation "
                    f"{100 * split['generation'] / result['train_s']:.0f}% / scoring "
                    f"{100 * split['scoring'] / result['train_s']:.0f}% / PPO epochs "
                    f"{100 * split['ppo_epochs'] / result['train_s']:.0f}%, other load "
                    f"{result['other_load_cores']:.2f} cores")
                runs.append(result)
        say("evaluating every policy against the SFT policy")
        evaluation = evaluate(runs, models, data, recipe, s)
        not_ppo_config = sorted(set.intersection(*[set(r["ignored_recipe_keys"]) for r in runs
                                                   if r["impl"] == "trl112"]))
        from bench.run import load_average, machine

        info = {"settings": s, "date": began.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                "load_average_end": load_average(), "versions": versions, "trl112_python": python112,
                "hidden_from_ours": hide,
                "models": models, "recipe": recipe, "recipe_not_ppo_config": not_ppo_config,
                "data": {k: v for k, v in data.items() if k != "held_out"}, "evaluation": evaluation,
                "workdir": work if args.workdir else None, "waited_for_quiet_s": gate.waited_s,
                "retried_s": gate.retried_s, "bench_wall_s": time.perf_counter() - STARTED}
        summary = summarise(info, runs)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    write(summary, args.md, args.json)
    print()
    print("\n".join(tables(summary)))
    print()
    say(f"wrote {args.md} and {args.json}")


if __name__ == "__main__":
    main()
