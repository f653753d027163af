"""The project's command line: `python -m pipeline <command>` (also installed as `rlhf-pipeline`).

  run DIR [--stages a,b] [--accelerate_config FILE] [--results FILE] [-- --field value ...]
        run every stage that has a recipe in DIR (pretrain, sft, reward, ppo), in order, each in its own
        process (through `accelerate launch` when a config is given); flags after `--` go to every stage
  ls    list the recipes shipped in recipes/
  cp NAME DEST
        copy a recipe folder (e.g. tiny, gpt2-hh) to DEST to edit it
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .config import STAGES, parse

ROOT = Path(__file__).resolve().parent.parent
HEADLINE = {
    "pretrain": ["eval_perplexity"],
    "sft": ["eval_perplexity"],
    "reward": ["eval_accuracy", "eval_margin"],
    "ppo": ["rm_score_sft", "rm_score_ppo", "rm_win_rate_vs_sft", "gold_score_sft", "gold_score_ppo",
            "gold_win_rate_vs_sft", "kl_to_sft", "eos_rate_ppo"],
}


def stage_command(stage: str, recipe: Path, overrides: list[str], accelerate_config: str | None) -> list[str]:
    script = ROOT / "scripts" / f"{stage}.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: run the pipeline from a checkout of the repository")
    launcher = [sys.executable]
    if accelerate_config:
        launcher += ["-m", "accelerate.commands.launch", "--config_file", accelerate_config]
    return launcher + [str(script), "--config", str(recipe), *overrides]


def run(recipe_dir: str, stages: list[str] | None = None, accelerate_config: str | None = None,
        overrides: list[str] = (), results_path: str | None = None) -> dict:
    """Run the stages in order; returns (and writes, after every stage) the collected results."""
    recipe_dir = Path(recipe_dir)
    if not recipe_dir.is_dir():
        raise FileNotFoundError(f"recipe folder '{recipe_dir}' does not exist (see `python -m pipeline ls`)")
    if accelerate_config and not os.path.isfile(accelerate_config):
        raise FileNotFoundError(f"accelerate config '{accelerate_config}' does not exist")
    unknown = set(stages or ()) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are: {', '.join(STAGES)}")
    plan = [s for s in STAGES if (recipe_dir / f"{s}.yaml").exists() and (not stages or s in stages)]
    if not plan:
        raise FileNotFoundError(f"no stage recipe ({', '.join(s + '.yaml' for s in STAGES)}) in '{recipe_dir}'")

    # Parse every recipe before training anything: a typo in the last recipe should not cost the first stages.
    output_dirs = {s: parse(s, ["--config", str(recipe_dir / f"{s}.yaml"), *overrides])[1].output_dir for s in plan}
    results_path = Path(results_path or Path(os.path.commonpath(list(output_dirs.values()))) / "results.json")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    started = time.time()
    for number, stage in enumerate(plan, 1):
        recipe = recipe_dir / f"{stage}.yaml"
        command = stage_command(stage, recipe, list(overrides), accelerate_config)
        print(f"\n=== [{number}/{len(plan)}] {stage}: {recipe} -> {output_dirs[stage]}", flush=True)
        stage_start = time.time()
        code = subprocess.call(command)
        if code != 0:
            print(f"\nstage {stage} failed (exit {code}); after fixing it, rerun from this stage with:\n  "
                  f"python -m pipeline run {recipe_dir} --stages {','.join(plan[number - 1:])}", file=sys.stderr)
            raise SystemExit(code)
        stage_results_file = Path(output_dirs[stage]) / "results.json"
        stage_results = json.loads(stage_results_file.read_text()) if stage_results_file.exists() else {}
        results[stage] = {**stage_results, "wall_seconds": round(time.time() - stage_start, 1)}
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2, sort_keys=True))
    results["wall_seconds_total"] = round(time.time() - started, 1)
    results_path.write_text(json.dumps(results, indent=2, sort_keys=True))
    print_summary(results, results_path)
    return results


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_summary(results: dict, results_path: Path) -> None:
    rows = [(stage, key, _fmt(results[stage][key]))
            for stage in STAGES if stage in results
            for key in HEADLINE[stage] + ["wall_seconds"] if key in results[stage]]
    width = max(len(f"{s}.{k}") for s, k, _ in rows)
    print(f"\n{'result':<{width}}  value")
    for stage, key, value in rows:
        print(f"{stage + '.' + key:<{width}}  {value}")
    print(f"{'wall_seconds_total':<{width}}  {_fmt(results.get('wall_seconds_total'))}")
    for sample in results.get("ppo", {}).get("samples", [])[:3]:
        print(f"\nprompt: {sample['prompt']}\n  sft: {sample['sft'].strip()}\n  ppo: {sample['ppo'].strip()}")
    print(f"\nresults written to {results_path}")


def copy_recipe(name: str, dest: str) -> None:
    source = ROOT / "recipes" / name
    if not source.is_dir():
        raise FileNotFoundError(f"no recipe '{name}' in {ROOT / 'recipes'}")
    if os.path.exists(dest):
        raise FileExistsError(f"'{dest}' already exists; choose a new folder")
    shutil.copytree(source, dest)
    print(f"copied {source} -> {dest}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run every stage of a recipe folder in order")
    run_parser.add_argument("recipe_dir")
    run_parser.add_argument("--stages", help="comma-separated subset, e.g. reward,ppo")
    run_parser.add_argument("--accelerate_config", help="launch each stage with `accelerate launch --config_file`")
    run_parser.add_argument("--results", help="results file (default: results.json beside the stage outputs)")
    commands.add_parser("ls", help="list the shipped recipes")
    cp_parser = commands.add_parser("cp", help="copy a shipped recipe folder to edit it")
    cp_parser.add_argument("name")
    cp_parser.add_argument("dest")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            run(args.recipe_dir, args.stages.split(",") if args.stages else None, args.accelerate_config,
                overrides, args.results)
        elif args.command == "ls":
            for folder in sorted(p for p in (ROOT / "recipes").iterdir() if p.is_dir()):
                print(f"{folder.name:<12} {' '.join(sorted(f.name for f in folder.glob('*.yaml')))}")
        else:
            copy_recipe(args.name, args.dest)
    except (ValueError, OSError) as error:
        if os.environ.get("PIPELINE_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
