"""`python -m pipeline compare`: which stage-3 algorithm? PPO, GRPO, RLOO and DPO (and PPO rewarded by the gold
oracle, the ceiling a learned reward model can reach) from one SFT policy and one reward model, over several
seeds, judged on ground truth by the embedded task's oracle.

1. The recipe folder's pretrain, SFT and reward stages run through the runner, as their recipes are (skipped when
   already done): every algorithm starts from that one SFT policy and, except DPO, trains against that one reward
   model. Flags after `--` go to the algorithms' runs only.
2. Each algorithm runs once per seed from its recipe (`<stage>.yaml`; the ceiling `ppo-oracle.yaml`), with only
   `--seed` and `--output_dir` changed, into `<output_dir>/<algorithm>/seed-<seed>`. A run that finished is
   not run again (`--force` reruns); one that was interrupted resumes from its checkpoint. A run folder whose
   inputs changed since it started (the resolved recipe with its overrides, or the SFT policy or reward model
   written again) is moved aside and run afresh, as the runner does with its stages.
3. Every run ends with the same evaluation against the SFT policy (pipeline.stages.policy_eval), so the results
   compare key for key. The stage's wall time and its peak RSS (the process tree's high-water mark, from
   `wait4`) are measured around it; episodes (or pairs) per second over `train()`'s own runtime.
4. bench/results/comparison.md and comparison.json: per algorithm, mean and spread (min-max) over the seeds of
   every figure; the gold score in its parts; two plots (gold score against KL to the SFT policy, and against
   training time).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .names import recipe_file

# algorithm -> (stage, recipe variant): the recipe is <stage>.yaml, or <stage>-<variant>.yaml
ALGORITHMS = {
    "ppo": ("ppo", None),
    "grpo": ("grpo", None),
    "rloo": ("rloo", None),
    "dpo": ("dpo", None),
    "ppo-oracle": ("ppo", "oracle"),
    # defences against reward hacking (recipes/tiny-biased, docs/overoptimization.md): PPO with one setting changed
    "ppo-kl": ("ppo", "kl"),
    "ppo-length": ("ppo", "length"),
    "ppo-ensemble": ("ppo", "ensemble"),
    "ppo-best": ("ppo", "best"),
    "ppo-kl-ensemble": ("ppo", "kl-ensemble"),
}
DEFENCES = ("ppo-kl", "ppo-length", "ppo-ensemble", "ppo-best", "ppo-kl-ensemble")
LABELS = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "dpo": "DPO", "ppo-oracle": "PPO, oracle reward (ceiling)",
          "ppo-kl": "PPO, KL penalty", "ppo-length": "PPO, length penalty",
          "ppo-ensemble": "PPO, ensemble mean - std", "ppo-best": "PPO, best held-out step",
          "ppo-kl-ensemble": "PPO, KL penalty + ensemble mean"}
COLORS = {"ppo": "tab:green", "grpo": "tab:blue", "rloo": "tab:purple", "dpo": "tab:red", "ppo-oracle": "tab:gray",
          "ppo-kl": "tab:olive", "ppo-length": "tab:brown", "ppo-ensemble": "tab:pink",
          "ppo-best": "black", "ppo-kl-ensemble": "tab:cyan"}
SEEDS = (42, 43, 44)
# How the shipped tiny recipes were set: said in comparison.md when they are the ones compared
TINY_TUNING = ("Tuning: the KL coefficient alone, per algorithm, on the demo's SFT policy and reward model and judged on "
               "the held-out prompts evaluated here: PPO's kl_coef 0.07, GRPO's beta 0.1 (at 0.05 it repeated a "
               "sentence in about half its answers); RLOO keeps 0.05, untuned. Otherwise GRPO and RLOO take "
               "ppo.yaml's values (learning rate, answers, length, temperature, 64 answers per optimizer step, "
               "2 passes) as they are; DPO takes the reward model's data budget, its 16000 pairs for 1.25 epochs, at "
               "ppo.yaml's learning rate.")
RUN_FILE = "compare_run.json"  # beside a run's results.json: its wall time, peak RSS and command
INPUTS_SUFFIX = ".inputs.json"  # seed-<seed>.inputs.json beside a run's folder, written when it starts: what it
# runs from (`run_inputs`); beside, not in it, since a stage refuses a new output folder holding files not its own
# the figures of a run, without the stage's suffix (gold_score_grpo -> gold_score), in the table's order
FIGURES = ("gold_score", "gold_score_peak", "gold_win_rate_vs_sft", "title_only_rate", "rm_score", "rm_win_rate_vs_sft", "kl_to_sft",
           "response_length", "eos_rate", "wall_seconds", "train_seconds", "units_per_second", "peak_rss_mb")
TERMS = ("gold_sentiment", "gold_asked_title", "gold_other_titles", "gold_repeated_sentences", "gold_unfinished",
         "gold_rambling", "gold_empty")


def measured_run(command: list[str]) -> tuple[int, float, float]:
    """Run `command`; (exit code, wall seconds, peak RSS in MB of the process and the children it waited for)."""
    start = time.time()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.time() - start, usage.ru_maxrss / 1024


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def training_units(stage: str, recipe: dict, state: dict, num_processes: int) -> tuple[int, str]:
    """What the run trained on: sampled answers (episodes) for the online algorithms, preference pairs for DPO."""
    steps = state.get("global_step", 0)
    per_step = recipe.get("per_device_train_batch_size", 1) * recipe.get("gradient_accumulation_steps", 1) * num_processes
    if stage == "ppo":
        return int(recipe["total_episodes"]), "episodes"
    if stage == "dpo":
        return steps * per_step, "pairs"
    return steps * per_step // max(1, recipe.get("num_iterations", 1)), "episodes"  # each answer, num_iterations times


def collect(algorithm: str, seed: int, run_dir: Path) -> dict:
    """One run's figures from its results.json, trainer_state.json, recipe.yaml and compare_run.json."""
    import yaml

    stage = ALGORITHMS[algorithm][0]
    results = _read(run_dir / "results.json")
    measured = _read(run_dir / RUN_FILE)
    state = _read(run_dir / "trainer_state.json")
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if (run_dir / "recipe.yaml").is_file() else {}
    row = {"algorithm": algorithm, "seed": seed, "output_dir": str(run_dir)}
    for key, value in results.items():
        if isinstance(value, (int, float)):
            row[key.removesuffix(f"_{stage}")] = value
    train_seconds = next((entry["train_runtime"] for entry in reversed(state.get("log_history", []))
                          if "train_runtime" in entry), None)
    units, unit = training_units(stage, recipe, state, results.get("num_processes", 1))
    if isinstance(results.get("curve"), list):  # the over-optimisation curve (curve_steps), for curve_plot
        row["curve"] = [{k: v for k, v in point.items() if k in ("step", "kl_to_sft", "gold_score", "rm_score")}
                        for point in results["curve"] if isinstance(point, dict)]
    if isinstance(results.get("alarms"), list):
        row["alarms"] = results["alarms"]
    row.update(wall_seconds=measured.get("wall_seconds"), peak_rss_mb=measured.get("peak_rss_mb"),
               train_seconds=train_seconds, units=units, unit=unit,
               units_per_second=units / train_seconds if train_seconds else None)
    return row


def summarise(rows: list[dict]) -> dict:
    """algorithm -> figure -> {"mean", "min", "max", "n"} over its seeds."""
    summary = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "seed":
                summary.setdefault(row["algorithm"], {}).setdefault(key, []).append(value)
    return {algorithm: {key: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "n": len(v)}
                        for key, v in figures.items()} for algorithm, figures in summary.items()}


def _cell(figure: dict | None, digits: int = 2) -> str:
    if not figure:
        return "-"
    mean, low, high = (f"{figure[k]:.{digits}f}" for k in ("mean", "min", "max"))
    return mean if figure["n"] == 1 or low == high else f"{mean} ({low} to {high})"


def plot(rows: list[dict], summary: dict, x_key: str, x_label: str, path: Path) -> Path:
    """Gold score (y) against `x_key`: one point per run, the mean of each algorithm ringed; the SFT policy as a
    dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for algorithm in ALGORITHMS:
        points = [(r[x_key], r["gold_score"]) for r in rows if r["algorithm"] == algorithm
                  and isinstance(r.get(x_key), (int, float)) and isinstance(r.get("gold_score"), (int, float))]
        if not points:
            continue
        ax.scatter(*zip(*points), color=COLORS[algorithm], alpha=0.6, label=LABELS[algorithm])
        ax.scatter(summary[algorithm][x_key]["mean"], summary[algorithm]["gold_score"]["mean"], s=220,
                   facecolors="none", edgecolors=COLORS[algorithm], linewidths=2)
    sft = [r["gold_score_sft"] for r in rows if isinstance(r.get("gold_score_sft"), (int, float))]
    if sft:
        ax.axhline(sum(sft) / len(sft), color="tab:orange", linestyle="--", label="SFT policy")
    ax.set_xlabel(x_label)
    ax.set_ylabel("gold score of held-out answers (max 4)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title("Each point a run (seed); rings: the mean over seeds")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_plot(rows: list[dict], path: Path) -> Path | None:
    """Gold score (left) and reward-model score (right) of held-out answers against KL to the SFT policy, along
    each run (curve_steps): one thin line per seed, one colour per algorithm (ppo-best's is PPO's, not drawn again).
    None if no run has a curve."""
    # keep_best changes only which step's policy the run keeps: its curve is undefended PPO's own
    runs = [r for r in rows if len(r.get("curve") or []) > 1 and r["algorithm"] != "ppo-best"]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((axes[0], "gold_score", "gold score (oracle)"),
                           (axes[1], "rm_score", "reward-model score (the proxy)")):
        labelled = set()
        for row in runs:
            xy = [(p["kl_to_sft"], p[key]) for p in row["curve"]
                  if isinstance(p.get("kl_to_sft"), (int, float)) and isinstance(p.get(key), (int, float))]
            if not xy:
                continue
            name = row["algorithm"]
            ax.plot(*zip(*xy), color=COLORS[name], alpha=0.7, linewidth=1.2, marker=".",
                    label=None if name in labelled else LABELS[name])
            labelled.add(name)
        ax.set_xlabel("KL to the SFT policy (nats per answer)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Along each run: held-out answers every curve_steps steps (one line per seed)")
    return _save(fig, path)


def render(config: dict, rows: list[dict], summary: dict, plots: list[Path], markdown_path: Path) -> str:
    """comparison.md: how it was run, the figures per algorithm (mean and min-max over seeds), the gold terms."""
    algorithms = [a for a in ALGORITHMS if a in summary]
    names = {"gold_score": "gold score", "gold_score_peak": "gold score at its peak (curve_steps)",
             "gold_win_rate_vs_sft": "gold win rate vs SFT",
             "title_only_rate": "names the asked title alone", "rm_score": "reward-model score",
             "rm_win_rate_vs_sft": "RM win rate vs SFT", "kl_to_sft": "KL to SFT (nats/answer)",
             "response_length": "answer length (tokens)", "eos_rate": "EOS rate", "wall_seconds": "stage wall time (s)",
             "train_seconds": "train() time (s)", "units_per_second": "episodes (DPO: pairs) per s",
             "peak_rss_mb": "peak RSS (MB)"}
    sft = [r["gold_score_sft"] for r in rows if isinstance(r.get("gold_score_sft"), (int, float))]
    defences = [a for a in algorithms if a in DEFENCES]
    undefended = [LABELS[a] for a in algorithms if a not in DEFENCES and a != "ppo-oracle"]
    title = (f"Reward hacking on ground truth: {', '.join(undefended)} undefended, and PPO's defences" if defences
             else "Which stage-3 algorithm? PPO, GRPO, RLOO and DPO on ground truth")
    lines = [f"# {title}", "",
             f"Written by `{config['command']}` on {config['date']} ({config['machine']}); its runs took "
             f"{config['runs_wall_seconds'] / 60:.0f} min in all (the sum of their wall times). "
             + (f"{config['note']} " if config.get("note") else "") +
             f"Seeds {', '.join(map(str, config['seeds']))}; each "
             "cell is the mean over the seeds, with the lowest and highest in brackets. Every run starts from the "
             f"same SFT policy (`{config['sft_model']}`) and, except DPO, trains against the same reward model "
             f"(`{config['reward_model']}`); PPO with the oracle as its reward is the ceiling.", "",
             "## Results", "",
             "| | SFT | " + " | ".join(LABELS[a] for a in algorithms) + " |",
             "|---|---:|" + "---:|" * len(algorithms)]
    for key in FIGURES:
        digits = 0 if key in ("peak_rss_mb", "wall_seconds", "train_seconds") else (1 if key in (
            "units_per_second", "response_length") else 2)
        sft_cell = f"{sum(sft) / len(sft):.2f}" if key == "gold_score" and sft else "-"
        lines.append(f"| {names[key]} | {sft_cell} | " + " | ".join(
            _cell(summary[a].get(key), digits) for a in algorithms) + " |")
    lines += ["", "## The gold score in its parts", "",
              "The mean of each term of the oracle over the held-out answers (they sum to the gold score): what "
              "each algorithm learned, and what it exploited in the reward model.", "",
              "| term | SFT | " + " | ".join(LABELS[a] for a in algorithms) + " |",
              "|---|---:|" + "---:|" * len(algorithms)]
    for term in TERMS:
        sft_term = [r[f"{term}_sft"] for r in rows if isinstance(r.get(f"{term}_sft"), (int, float))]
        lines.append(f"| {term.removeprefix('gold_')} | " + (f"{sum(sft_term) / len(sft_term):.2f}" if sft_term else "-")
                     + " | " + " | ".join(_cell(summary[a].get(term)) for a in algorithms) + " |")
    lines += ["", "## Budget", ""] + [f"- {line}" for line in config["budget"]]
    lines += ["", "## Plots", ""]
    for path in plots:
        lines += [f"![{path.stem}]({os.path.relpath(path, markdown_path.parent)})", ""]
    alarms = any("alarms" in r for r in rows)
    lines += ["## Runs", "", "| algorithm | seed | gold score | gold win rate | KL | wall (s) | "
              + ("alarms fired | " if alarms else "") + "output |",
              "|---|---:|---:|---:|---:|---:|" + ("---|" if alarms else "") + "---|"]
    for r in rows:
        lines.append(f"| {LABELS[r['algorithm']]} | {r['seed']} | {r.get('gold_score', float('nan')):.2f} | "
                     f"{r.get('gold_win_rate_vs_sft', float('nan')):.2f} | {r.get('kl_to_sft', float('nan')):.2f} | "
                     f"{(r.get('wall_seconds') or 0):.0f} | "
                     + ((", ".join(r.get("alarms") or []) or "none") + " | " if alarms else "")
                     + f"`{r['output_dir']}` |")
    return "\n".join(lines) + "\n"


def budget_lines(recipe_dir: Path, algorithms: list[str], overrides: list[str]) -> list[str]:
    """What each algorithm was given, read from its parsed recipe (so the statement is the recipes' own)."""
    from .config import parse

    lines = []
    for algorithm in algorithms:
        stage, variant = ALGORITHMS[algorithm]
        script_args, args, _ = parse(stage, ["--config", str(recipe_file(recipe_dir, stage, variant)), *overrides])
        if stage == "ppo":
            text = (f"{args.total_episodes} episodes (prompts sampled once each), {args.num_ppo_epochs} PPO epochs, "
                    f"answers of up to {args.response_length} tokens at temperature {args.temperature}, "
                    f"kl_coef {args.kl_coef}")
            if script_args.kl_control == "adaptive":
                text += f" adaptive (target {script_args.kl_target:g} nats, horizon {script_args.kl_horizon})"
            for name, weight in zip(script_args.reward_functions, script_args.reward_function_weights
                                    or [1.0] * len(script_args.reward_functions)):
                text += f", reward function {name} x {weight:g}"
            if script_args.reward_model_weight == 0:
                text += ", no reward model"
            if script_args.reward_ensemble in ("mean", "mean_minus_std"):
                text += f", reward ensemble {script_args.reward_ensemble}" + (
                    f" (k {script_args.reward_ensemble_k:g})" if script_args.reward_ensemble == "mean_minus_std" else "")
            if script_args.keep_best:
                text += f", keeps the best held-out step (evaluated every {script_args.curve_steps} steps)"
        elif stage == "dpo":
            text = (f"the reward model's preference pairs, {args.num_train_epochs:g} epoch(s), beta {args.beta}; "
                    "no sampling")
        else:
            episodes = (args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
                        // args.num_iterations)
            text = (f"{episodes} episodes ({episodes // args.num_generations} prompts x {args.num_generations} "
                    f"answers), {args.num_iterations} passes over each, answers of up to {args.max_completion_length} "
                    f"tokens at temperature {args.temperature}, beta {args.beta}")
        lines.append(f"{LABELS[algorithm]} (`{recipe_file(recipe_dir, stage, variant)}`): {text}, learning rate "
                     f"{args.learning_rate:g}, batch {args.per_device_train_batch_size} x "
                     f"{args.gradient_accumulation_steps} accumulation.")
    return lines


def available(recipe_dir) -> list[str]:
    """The algorithms whose recipe the folder has (what `compare` runs when none is named)."""
    return [a for a in ALGORITHMS if recipe_file(Path(recipe_dir), *ALGORITHMS[a]).is_file()]


def compare(recipe_dir: str = "recipes/tiny", seeds=SEEDS, algorithms=None,
            output_dir: str = "outputs/compare", markdown: str = "bench/results/comparison.md",
            plots_dir: str = "docs/comparison", overrides: list[str] = (), accelerate_config: str | None = None,
            force: bool = False, note: str | None = None) -> dict:
    from .cli import ROOT, stage_command
    from .cli import run as run_stages

    recipe_dir, output_dir, markdown = Path(recipe_dir), Path(output_dir), Path(markdown)
    algorithms = available(recipe_dir) if not algorithms else algorithms
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithm(s) {unknown}; algorithms are: {', '.join(ALGORITHMS)}")
    missing = [str(recipe_file(recipe_dir, *ALGORITHMS[a])) for a in algorithms
               if not recipe_file(recipe_dir, *ALGORITHMS[a]).is_file()]
    if missing:
        raise FileNotFoundError(f"no recipe {', '.join(missing)}: compare runs each algorithm from its recipe")
    budget = budget_lines(recipe_dir, list(algorithms), list(overrides))  # every recipe parses before anything runs
    started = time.time()
    print(f"\n=== compare: the SFT policy and reward model of {recipe_dir}", flush=True)
    # the chain as its recipes have it: the overrides are for the algorithms' runs
    run_stages(str(recipe_dir), [s for s in ("pretrain", "sft", "reward") if recipe_file(recipe_dir, s).is_file()],
               accelerate_config, [], evaluate=False)  # a folder without pretrain.yaml starts from a Hub model

    rows = []
    for algorithm in algorithms:
        stage, variant = ALGORITHMS[algorithm]
        for seed in seeds:
            run_dir = output_dir / algorithm / f"seed-{seed}"
            run_args = [*overrides, "--seed", str(seed), "--output_dir", str(run_dir)]
            inputs = run_inputs(recipe_dir, stage, variant, run_args)
            inputs_file = run_dir.with_name(run_dir.name + INPUTS_SUFFIX)
            changed = run_dir.exists() and _recorded_inputs(inputs_file) != inputs
            if force or changed or not (run_dir / "results.json").is_file() or not (run_dir / RUN_FILE).is_file():
                if (force or changed) and run_dir.exists():
                    aside = f"{run_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                    os.rename(run_dir, aside)
                    if inputs_file.exists():
                        os.rename(inputs_file, aside + INPUTS_SUFFIX)
                    if changed and not force:
                        print(f"\ncompare: {run_dir} ran from another recipe, SFT policy or reward model: moved to "
                              f"{aside}, run again", flush=True)
                print(f"\n=== compare: {algorithm}, seed {seed} -> {run_dir}", flush=True)
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                inputs_file.write_text(json.dumps(inputs, indent=2, sort_keys=True))
                command = stage_command(stage, recipe_file(recipe_dir, stage, variant), run_args, accelerate_config)
                code, wall, rss = measured_run(command)
                if code != 0:
                    print(f"compare: {algorithm} seed {seed} failed (exit {code}); rerun the same command to go on "
                          "from there", file=sys.stderr)
                    raise SystemExit(code)
                (run_dir / RUN_FILE).write_text(json.dumps(
                    {"wall_seconds": round(wall, 1), "peak_rss_mb": round(rss, 1), "command": command}, indent=2))
            rows.append(collect(algorithm, seed, run_dir))

    summary = summarise(rows)
    plots_dir = Path(plots_dir)
    plots = [plot(rows, summary, "kl_to_sft", "KL to the SFT policy (nats per answer)", plots_dir / "gold_vs_kl.png"),
             plot(rows, summary, "train_seconds", "train() time (s)", plots_dir / "gold_vs_time.png")]
    plots += [p for p in [curve_plot(rows, plots_dir / "overoptimization.png")] if p is not None]
    config = {
        "command": "python -m pipeline compare " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["compare"]
        else "pipeline.compare.compare()",
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores",
        "recipes": str(recipe_dir), "seeds": list(seeds), "algorithms": list(algorithms), "overrides": list(overrides),
        "sft_model": _parsed_output(recipe_dir, "sft"), "reward_model": _parsed_output(recipe_dir, "reward"),
        "budget": budget + ([TINY_TUNING] if recipe_dir.resolve() == (ROOT / "recipes" / "tiny").resolve() else []),
        "wall_seconds_total": round(time.time() - started, 1),  # this call's (finished runs are not rerun)
        "runs_wall_seconds": round(sum(r["wall_seconds"] or 0 for r in rows), 1),
        "note": note,
    }
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render(config, rows, summary, plots, markdown))
    data = {"config": config, "summary": summary, "runs": rows}
    markdown.with_suffix(".json").write_text(json.dumps(data, indent=2, sort_keys=True))
    print(f"\ncomparison written to {markdown} and {markdown.with_suffix('.json')}; plots in {plots_dir}")
    return data


def run_inputs(recipe_dir: Path, stage: str, variant: str | None, run_args: list[str]) -> dict:
    """What a run computes from: its resolved recipe (the runner's fingerprint, overrides, seed and output folder
    included) and when the chain's SFT policy and reward model were last written (their results.json)."""
    from .cli import fingerprint
    from .config import parse

    parsed = parse(stage, ["--config", str(recipe_file(recipe_dir, stage, variant)), *run_args])
    models = {}
    for upstream in ("sft", "reward"):
        if recipe_file(recipe_dir, upstream).is_file():
            done = Path(_parsed_output(recipe_dir, upstream)) / "results.json"
            models[upstream] = done.stat().st_mtime_ns if done.is_file() else None
    return {"recipe": fingerprint(parsed), "models": models}


def _recorded_inputs(inputs_file: Path) -> dict | None:
    try:
        return json.loads(inputs_file.read_text())
    except (OSError, ValueError):
        return None  # a run from before compare recorded its inputs: run again


def _parsed_output(recipe_dir: Path, stage: str) -> str:
    from .config import parse

    return parse(stage, ["--config", str(recipe_file(recipe_dir, stage))])[1].output_dir
