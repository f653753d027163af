"""The project's command line: `python -m pipeline <command>` (also installed as `rlhf-pipeline`).

  run DIR [--stages a,b] [--accelerate_config FILE] [--results FILE] [--lora] [--jobs N] [-- --field value ...]
        run the stages that have a recipe in DIR in order, each in its own process (through `accelerate
        launch` when a config is given): pretrain, sft, reward, ppo (then ppo-oracle, PPO on the oracle as
        the ceiling, where DIR has its recipe), or those --stages names (also grpo, rloo, dpo, ppo-oracle;
        `all` for every one); flags after `--` go to every stage; --lora runs the stages that
        have a LoRA recipe (<stage>-lora.yaml) instead; on the CPU, stages that read no output of each other
        (ppo and ppo-oracle) run two at a time, a thread each on 2 cores (--jobs 1: one at a time)
  compare [--recipes DIR] [--seeds 0,1,2] [--algorithms ...]
        PPO, GRPO, RLOO, DPO and oracle-reward PPO from one SFT policy and reward model, over seeds:
        bench/results/comparison.md and .json, and plots (see docs/alignment.md)
  eval suite DIR | policy MODEL | compare A B | reward MODEL | perplexity MODEL | fewshot MODEL
        evaluate any checkpoint (a local folder or a Hub id); prints JSON (--output FILE writes it)
  generate MODEL PROMPT...   answer prompts (greedy, sampling or beam search)
  chat MODEL                 talk to a model; the conversation is kept in its chat template
  push OUTPUT_DIR --repo_id ID   push a stage's output folder to the Hub (retry a failed push)
  merge ADAPTER_DIR OUTPUT_DIR [--base_model PATH]
        merge a LoRA adapter into its base model: one plain transformers checkpoint (+ tokenizer)
  ls    list the recipes shipped in recipes/
  cp NAME DEST
        copy a recipe folder (e.g. tiny, gpt2-hh) to DEST to edit it

An error prints one line and exits 2 (Ctrl-C: 130); --debug (anywhere before `--`) shows the traceback instead.
"""

import argparse
import atexit
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# Only light imports here: torch, transformers and TRL load when a command needs them (--help and ls stay fast)
from .names import CEILING, CHAIN, PUSH_FAILED, STAGE3, STAGES, recipe_file, script_of, upstream

ROOT = Path(__file__).resolve().parent.parent
HEADLINE = {
    "pretrain": ["eval_perplexity"],
    "sft": ["eval_perplexity"],
    "reward": ["eval_accuracy", "eval_title_only_accuracy", "eval_repeat_only_accuracy", "eval_margin"],
    **{stage: ["rm_score_sft", f"rm_score_{stage}", "rm_win_rate_vs_sft", "gold_score_sft", f"gold_score_{stage}",
               "gold_win_rate_vs_sft", "title_only_rate_sft", f"title_only_rate_{stage}", "repeat_rate_sft",
               f"repeat_rate_{stage}", "kl_to_sft", f"eos_rate_{stage}"] for stage in STAGE3},
    CEILING: ["gold_score_ppo", "gold_win_rate_vs_sft", "title_only_rate_ppo", "repeat_rate_ppo", "kl_to_sft"],
}


LORA = "lora"  # `run --lora`: the recipes <stage>-lora.yaml


def stage_command(stage: str, recipe: Path, overrides: list[str], accelerate_config: str | None) -> list[str]:
    script = ROOT / "scripts" / f"{script_of(stage)}.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: run the pipeline from a checkout of the repository")
    launcher = [sys.executable]
    if accelerate_config:
        launcher += ["-m", "accelerate.commands.launch", "--config_file", accelerate_config]
    return launcher + [str(script), "--config", str(recipe), *overrides]


class Child:
    """A stage (or the evaluation) started by `start`: a forked child's pid, or a new process; the runner notes
    which stage it is and when it started."""

    def __init__(self, pid: int | None = None, process: subprocess.Popen | None = None, log: Path | None = None):
        self.pid, self.process, self.log = pid, process, log
        self.stage, self.started = None, time.time()


def start(command: list[str], in_process=None, log: Path | None = None, threads: int | None = None) -> Child:
    """Start one stage (or the evaluation) in a process of its own. Without an accelerate launcher, on Linux,
    `in_process` (a callable) runs in a child forked from this process, which has imported torch, TRL and the
    stage's module already (they take about 8 s to import on 2 cores, once per stage otherwise); the child is a
    separate process all the same: its memory is freed and its state dropped when it exits. Elsewhere, or once
    this process has started CUDA (reading a GPU recipe's training arguments does; a forked child cannot use it),
    `command` runs as a new Python process. `log`: the child's stdout and stderr go to that file instead of the
    terminal; `threads`: the CPU threads the child's torch uses (OMP_NUM_THREADS for a new process)."""
    torch = sys.modules.get("torch")
    cuda_started = torch is not None and torch.cuda.is_initialized()
    output = open(log, "w") if log else None
    try:
        if in_process is None or cuda_started or not sys.platform.startswith("linux"):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
            return Child(process=subprocess.Popen(command, stdout=output, stderr=output, env=env), log=log)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: run, then leave without returning into the runner's frames
            _run_child(in_process, output, threads)
        return Child(pid=pid, log=log)
    finally:
        if output:
            output.close()  # the child holds its own copy


def _run_child(in_process, output, threads: int | None):
    code = 1
    try:
        if output:  # file descriptors 1 and 2 (what libraries and subprocesses write to), and Python's streams
            os.dup2(output.fileno(), 1)
            os.dup2(output.fileno(), 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
        if threads:
            import torch

            torch.set_num_threads(threads)
        atexit._clear()  # the runner's own exit handlers are the runner's; the stage registers its own
        in_process()
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
        if isinstance(exit.code, str):
            print(exit.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # what a normal exit runs (loggers, writers); os._exit skips it
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        finally:
            os._exit(code)


def _exit_code(child: Child, block: bool) -> int | None:
    """The child's exit code once it has ended (waiting for it when `block`), else None."""
    if child.process:
        return child.process.wait() if block else child.process.poll()
    pid, status = os.waitpid(child.pid, 0 if block else os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if pid else None


class Stopped(BaseException):
    """The runner was sent SIGTERM, SIGUSR1 or Ctrl-C: its running stages wrote a checkpoint and stopped."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _signal_stage(child: Child, signum: int) -> None:
    """Send a stage the signal: a forked child itself; under `accelerate launch`, the stage's processes (the
    launcher's children: torch's launcher, signalled itself, kills its workers 30 s later)."""
    import psutil

    try:
        if child.pid is not None:
            os.kill(child.pid, signum)
        elif "accelerate.commands.launch" in map(str, child.process.args):
            for worker in psutil.Process(child.process.pid).children():
                worker.send_signal(signum)
        else:
            child.process.send_signal(signum)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass


def wait(children: list[Child]):
    """Yield (child, exit code) as each child ends. A first SIGTERM or SIGUSR1 is passed on to the running stages
    (Ctrl-C reaches them from the terminal already), which write a checkpoint at the end of the step in flight and
    stop; once they have, `Stopped` is raised. A second signal stops them at once: they get a moment to say how to
    resume, then those still running are stopped, and KeyboardInterrupt is raised."""
    running = list(children)
    received = []

    def forward(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\npipeline run: {name} received: the running stage(s) write a checkpoint at the end of the step in "
              "flight, then stop (send it again to stop at once)", file=sys.stderr, flush=True)
        if signum != signal.SIGINT:
            for child in running:
                _signal_stage(child, signum)

    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, forward) for signum in PREEMPTION_SIGNALS} if main_thread else {}
    try:
        while running:
            for child in list(running):
                code = _exit_code(child, block=len(running) == 1)
                if code is not None:
                    running.remove(child)
                    yield child, code
            time.sleep(0.1 if running else 0)
    except (KeyboardInterrupt, SystemExit):
        deadline = time.time() + 1.0
        while running and time.time() < deadline:
            running = [child for child in running if _exit_code(child, block=False) is None]
            time.sleep(0.05 if running else 0)
        for child in running:
            os.kill(child.pid if child.pid is not None else child.process.pid, signal.SIGKILL)
            _exit_code(child, block=True)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise Stopped(received[0])


def call(command: list[str], in_process=None) -> int:
    """Run one stage (or the evaluation) as `start` does, in the terminal; its exit code."""
    return [code for _, code in wait([start(command, in_process)])][0]


def _stage_in_process(stage: str, recipe: Path, overrides: list[str]):
    """What `python scripts/<stage>.py --config RECIPE OVERRIDES` runs, as a callable for `call`, its stage module
    imported here first (so that each forked child finds it loaded)."""
    import importlib

    from .stages import run as run_stage

    importlib.import_module(f"pipeline.stages.{script_of(stage)}")
    return lambda: run_stage(script_of(stage), ["--config", str(recipe), *overrides])


STATE_FILE = "pipeline_state.json"
# Fields that change how a run is watched, not what it computes: editing them does not rerun a stage.
NOT_FINGERPRINTED = {"disable_tqdm", "report_to", "logging_steps", "logging_first_step", "log_level",
                     "push_to_hub", "hub_model_id", "hub_private_repo", "hub_revision", "hub_strategy",
                     "save_total_limit", "num_sample_generations"}


def recipe_of(parsed) -> dict:
    """A stage's resolved recipe as the runner compares it: every field of its three parsed dataclasses but those
    that only change how a run is watched, in JSON's types."""
    from .hub import resolved_recipe

    recipe = {k: v for k, v in resolved_recipe(*parsed).items() if k not in NOT_FINGERPRINTED}
    return json.loads(json.dumps(recipe, sort_keys=True, default=str))


def fingerprint(parsed) -> str:
    """A short hash of a stage's resolved recipe (`recipe_of`)."""
    return hashlib.sha256(json.dumps(recipe_of(parsed), sort_keys=True).encode()).hexdigest()[:16]


def defaults_of(parsed) -> dict:
    """The default of every field of a stage's three dataclasses that has one, in `recipe_of`'s types."""
    import dataclasses

    from .hub import _plain

    defaults = {}
    for args in parsed:
        for field in dataclasses.fields(args):
            if field.init and field.default is not dataclasses.MISSING:
                defaults[field.name] = _plain(field.default)
            elif field.init and field.default_factory is not dataclasses.MISSING:
                defaults[field.name] = _plain(field.default_factory())
    return json.loads(json.dumps(defaults, default=str))


def recipe_changes(old: dict, new: dict, defaults: dict) -> list[str]:
    """The fields of `new` that `old` (a finished run's recipe) did not have so: set to another value, or new since
    that run (a newer pipeline, TRL or transformers added them) and not at their default. Fields only `old` has
    (the installed versions dropped them) and those that only change how a run is watched are not changes."""
    return sorted(key for key, value in new.items() if key not in NOT_FINGERPRINTED and (
        old[key] != value if key in old else key not in defaults or defaults[key] != value))


def _recorded_recipe(done: dict, output_dir: str) -> dict | None:
    """The recipe a finished stage ran with: the state's record, or for a run recorded before the state kept it,
    the recipe.yaml it saved (which also holds what the stage computed, e.g. PPO's batch sizes: a field it changed
    then reads as changed, and the stage reruns)."""
    if "recipe" in done:
        return done["recipe"]
    try:
        import yaml

        with open(os.path.join(output_dir, "recipe.yaml")) as f:
            recorded = yaml.safe_load(f)
    except (OSError, ValueError):
        return None
    return json.loads(json.dumps(recorded, default=str)) if isinstance(recorded, dict) else None


def plan_stage(stage: str, fingerprints: dict, state: dict, output_dir: str, force: bool,
               stale: bool = False, recipe: dict | None = None, defaults: dict | None = None) -> tuple[str, str]:
    """("skip" | "run", why): a stage is skipped when it finished with the same recipe and the same
    recipes before it, after the models it reads were written (`stale`: one was written after it finished, e.g.
    by a --force rerun of a stage before it); otherwise it runs again, its old output moved aside. With `recipe`
    and `defaults` (`recipe_of`, `defaults_of`), a recipe whose only new fields are at their defaults (an upgrade
    added them) is the same recipe."""
    done = state.get(stage)
    inputs = {s: state[s]["fingerprint"] for s in upstream(stage) if s in state}
    finished = os.path.isfile(os.path.join(output_dir, "results.json"))
    changes = []
    if done and done["fingerprint"] != fingerprints[stage]:
        old = _recorded_recipe(done, output_dir) if recipe is not None else None
        changes = ["(not recorded)"] if old is None else recipe_changes(old, recipe, defaults or {})
    if done and finished and not force and not stale and not changes and done["upstream"] == inputs:
        return "skip", "finished with this recipe and these inputs (--force reruns it)"
    if done and os.path.isdir(output_dir):
        aside = stamped = f"{output_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        for n in range(2, 1000):  # a second replacement within the same second
            if not os.path.exists(aside):
                break
            aside = f"{stamped}-{n}"
        os.rename(output_dir, aside)
        del state[stage]  # no longer finished: if this run is interrupted, the next one resumes it
        named = "" if changes == ["(not recorded)"] else f" ({', '.join(changes[:5])}{', ...' * (len(changes) > 5)})"
        why = "forced" if force else (f"its recipe changed{named}" if changes
                                      else "a stage before it changed" if done["upstream"] != inputs
                                      else "a model it reads was written after it finished")
        return "run", f"{why}; the previous output was moved to {aside}"
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*")) if os.path.isdir(output_dir) else []
    if checkpoints:
        return "run", f"interrupted: resuming from its last checkpoint in {output_dir}"
    return "run", "not run yet"


def run_folder(output_dirs: list[str]) -> Path:
    """Where the run's results, state and report go: the folder that holds every stage's output folder."""
    common = Path(os.path.commonpath([os.path.abspath(d) for d in output_dirs]))
    folder = common.parent if str(common) in {os.path.abspath(d) for d in output_dirs} else common
    relative = os.path.relpath(folder)
    return Path(relative) if not relative.startswith("..") else folder


def stage_jobs(jobs: int | None, accelerate_config: str | None, training_args: list) -> int:
    """How many stages may run at once: `jobs` when given; by default 2 on the CPU without an accelerate
    launcher, when torch has at least 2 threads to split between them (two small stages side by side, a thread
    each, finish sooner than one after the other with two: one thread of a tiny model's step is more than half
    as fast as two), else 1."""
    if jobs is not None:
        if jobs < 1:
            raise ValueError(f"--jobs must be 1 or more, got {jobs}")
        if jobs > 1 and accelerate_config:
            raise ValueError("--jobs above 1 runs stages side by side without a launcher; with --accelerate_config "
                             "each stage already uses every process the config names (use --jobs 1)")
        return jobs
    import torch

    on_cpu = all(args.use_cpu for args in training_args) or not torch.cuda.is_available()
    return 2 if not accelerate_config and on_cpu and torch.get_num_threads() >= 2 else 1


def waves(plan: list[str], jobs: int) -> list[list[str]]:
    """The plan's stages in runs of at most `jobs` that can go side by side: a stage joins the run before it
    when it reads no output of a stage in it (the stage-3 algorithms and the ceiling read only pretrain, sft
    and reward); the order of the plan is kept."""
    grouped = []
    for stage in plan:
        if grouped and len(grouped[-1]) < jobs and not set(upstream(stage)) & set(grouped[-1]):
            grouped[-1].append(stage)
        else:
            grouped.append([stage])
    return grouped


def run(recipe_dir: str, stages: list[str] | None = None, accelerate_config: str | None = None,
        overrides: list[str] = (), results_path: str | None = None, evaluate: bool = True,
        force: bool = False, variant: str | None = None, jobs: int | None = None) -> dict:
    """Run the stages in order; returns (and writes, after every stage) the collected results.

    A stage that already finished with the same resolved recipe, after the same earlier stages, is skipped;
    `force` reruns every stage. `variant` ("lora") runs the stages that have a <stage>-<variant>.yaml recipe,
    from those recipes (the stages before read the outputs their recipes name, e.g. the full pretrain)."""
    started = time.time()  # the total counts the runner's own imports and checks, not the stages alone
    rerun = _rerun_command(recipe_dir, accelerate_config, overrides, results_path, evaluate, force, variant, jobs)
    _check_recipe_dir(str(recipe_dir), "run")
    recipe_dir = Path(recipe_dir)
    _check_file_arg(accelerate_config, "--accelerate_config", "e.g. recipes/accelerate/multi_gpu.yaml")
    if accelerate_config and not os.path.isfile(accelerate_config):
        raise FileNotFoundError(f"accelerate config '{accelerate_config}' does not exist")
    _check_file_arg(results_path, "--results", "e.g. outputs/mine/results.json")
    named = [s for s in stages or () if s != "all"]
    stages = [*STAGES, CEILING] if stages and "all" in stages else stages
    unknown = set(stages or ()) - {*STAGES, CEILING}
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are: {', '.join(STAGES)}, {CEILING} (or all)")
    missing = [s for s in named if not recipe_file(recipe_dir, s, variant).exists()]
    if missing:  # a stage named on purpose is never skipped in silence (`all` means those that have a recipe)
        have = sorted(p.name for p in recipe_dir.glob("*.yaml")) or ["no recipe"]
        raise FileNotFoundError(
            f"--stages names {', '.join(missing)}, but '{recipe_dir}' has no "
            f"{' or '.join(recipe_file('', s, variant).name for s in missing)} (it has: {', '.join(have)}); add the "
            f"recipe (e.g. from recipes/tiny) or leave {', '.join(missing)} out of --stages; nothing was run")
    plan = [s for s in STAGES if recipe_file(recipe_dir, s, variant).exists() and s in (stages or CHAIN)]
    # The oracle-reward ceiling, after ppo: in the default chain (or when named) where its recipe exists
    if (not stages or CEILING in stages) and not variant and recipe_file(recipe_dir, CEILING).exists():
        plan.insert(plan.index("ppo") + 1 if "ppo" in plan else len(plan), CEILING)
    if not plan:
        raise FileNotFoundError(f"no stage recipe ({', '.join(recipe_file('', s, variant).name for s in STAGES)}) "
                                f"in '{recipe_dir}'")

    from .config import parse
    from .stages import require_output_dir

    # Parse every recipe before training anything: a typo in the last recipe should not cost the first stages.
    parsed = {}
    for s in [*STAGES, *([CEILING] if CEILING in plan else [])]:
        if recipe_file(recipe_dir, s, variant).exists():
            try:
                parsed[s] = parse(script_of(s), ["--config", str(recipe_file(recipe_dir, s, variant)), *overrides])
                require_output_dir(["--config", str(recipe_file(recipe_dir, s, variant)), *overrides])
            except ValueError as error:
                unused = "not used by the HfArgumentParser" in str(error)
                raise ValueError(f"{s} stage: {error}" + (
                    f" (flags after `--` go to every stage with a recipe in {recipe_dir}, and {s} has no such field; "
                    f"set it in that stage's recipe, or run the stage alone: scripts/<stage>.py --config ...)"
                    if unused else "")) from None
    output_dirs = {s: args[1].output_dir for s, args in parsed.items()}
    writers = {}
    for s, folder in output_dirs.items():  # two stages in one folder: the second would refuse it, or resume the first
        first = writers.setdefault(os.path.abspath(folder), s)
        if first != s:
            raise ValueError(f"stages {first} and {s} would both write to {folder}" + (
                " (flags after `--` go to every stage: set output_dir in each stage's recipe instead)"
                if any(o.split("=")[0] in ("--output_dir", "--output-dir") for o in overrides)
                else ": give each stage its own output_dir in its recipe") + "; nothing was run")
    fingerprints = {s: fingerprint(args) for s, args in parsed.items()}
    recipes = {s: recipe_of(args) for s, args in parsed.items()}
    results_path = Path(results_path or run_folder(list(output_dirs.values())) / "results.json")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    state_path = results_path.with_name(STATE_FILE)
    state = json.loads(state_path.read_text()) if state_path.exists() else {}

    push_failures, numbers = [], {stage: number for number, stage in enumerate(plan, 1)}
    jobs = stage_jobs(jobs, accelerate_config, [parsed[s][1] for s in plan])
    for wave in waves(plan, jobs):
        todo = []
        for stage in wave:
            stale = bool(stale_stages({stage: model_inputs(parsed[stage])}, output_dirs))
            action, why = plan_stage(stage, fingerprints, state, output_dirs[stage], force, stale,
                                     recipes[stage], defaults_of(parsed[stage]))
            state_path.parent.mkdir(parents=True, exist_ok=True)
            state_path.write_text(json.dumps(state, indent=2, sort_keys=True))
            print(f"\n=== [{numbers[stage]}/{len(plan)}] {stage}: {recipe_file(recipe_dir, stage, variant)} -> "
                  f"{output_dirs[stage]}\n    {action}: {why}", flush=True)
            if action == "run":
                todo.append(stage)
        threads, logs = None, {}
        if len(todo) > 1:
            import torch

            threads = max(1, torch.get_num_threads() // len(todo))
            logs = {stage: results_path.parent / "logs" / f"{stage}.log" for stage in todo}
            logs[todo[0]].parent.mkdir(parents=True, exist_ok=True)
            print(f"\n=== {' and '.join(todo)}: side by side, {threads} CPU thread{'s' * (threads > 1)} each "
                  f"(--jobs 1 runs them one after the other); each one's output follows when it ends (as it runs: "
                  f"tail -f {logs[todo[0]]})", flush=True)
        children = []
        for stage in todo:
            recipe = recipe_file(recipe_dir, stage, variant)
            command = stage_command(stage, recipe, list(overrides), accelerate_config)
            in_process = None if accelerate_config else _stage_in_process(stage, recipe, list(overrides))
            children.append(start(command, in_process, logs.get(stage), threads))
            children[-1].stage = stage
        failed, ended = [], set()
        try:
            for child, code in wait(children):
                ended.add(child.stage)
                stage, wall = child.stage, round(time.time() - child.started, 1)
                if child.log:
                    print(f"\n=== {stage}: ended after {wall} s; its output ({child.log}):", flush=True)
                    output = child.log.read_text(errors="replace")
                    sys.stdout.write(output if output.endswith("\n") or not output else output + "\n")
                    sys.stdout.flush()
                if code == PUSH_FAILED:  # trained and saved; only the push failed (its retry command was printed)
                    push_failures.append(stage)
                elif code != 0:
                    failed.append((numbers[stage], stage, code))
                    continue
                stage_results_file = Path(output_dirs[stage]) / "results.json"
                stage_results = json.loads(stage_results_file.read_text()) if stage_results_file.exists() else {}
                results[stage] = {**stage_results, "wall_seconds": wall}
                if len(todo) > 1:
                    results[stage]["side_by_side_with"] = ", ".join(s for s in todo if s != stage)
                results_path.parent.mkdir(parents=True, exist_ok=True)
                results_path.write_text(json.dumps(results, indent=2, sort_keys=True))
                state[stage] = {"fingerprint": fingerprints[stage], "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "upstream": {s: state[s]["fingerprint"] for s in upstream(stage) if s in state},
                                "recipe": recipes[stage]}
                state_path.write_text(json.dumps(state, indent=2, sort_keys=True))
        except KeyboardInterrupt:
            stopped = [child for child in children if child.log and child.stage not in ended]
            if stopped:
                print("\n" + "; ".join(f"{child.stage} was stopped: its output is in {child.log}" for child in stopped),
                      file=sys.stderr, flush=True)
            raise
        if failed:
            first, stage, code = min(failed)
            print("\n" + "; ".join(f"stage {s} failed (exit {c})" for _, s, c in sorted(failed))
                  + f"; after fixing it, rerun from {'this stage' if len(failed) == 1 else stage} with:\n  "
                  + rerun(plan[first - 1:]), file=sys.stderr)
            raise SystemExit(code)
    if evaluate:
        print(f"\n=== evaluation: {recipe_dir}", flush=True)
        eval_start = time.time()
        eval_argv = ["eval", "--output", str(results_path.with_name("eval.json")), "suite", str(recipe_dir),
                     *([f"--{variant}"] if variant else []), "--", *overrides]
        code = call([sys.executable, "-m", "pipeline", *eval_argv], lambda: main(eval_argv))
        if code != 0:
            raise SystemExit(code)
        results["eval"] = {**json.loads(results_path.with_name("eval.json").read_text()),
                           "wall_seconds": round(time.time() - eval_start, 1)}
    results["wall_seconds_total"] = round(time.time() - started, 1)
    stale = stale_stages({s: model_inputs(args) for s, args in parsed.items() if s in results}, output_dirs)
    results.pop("stale", None)
    if stale:  # every stage's figures whose input model was written after them, and the command that updates them
        results["stale"] = {s: f"{why}; rerun it: {rerun(list(stale))}" for s, why in stale.items()}
    results_path.write_text(json.dumps(results, indent=2, sort_keys=True))
    from .report import write_report

    report = write_report(results_path.parent, output_dirs, results_path)
    print_summary(results, results_path)
    print(f"report (plots and samples): {report}")
    if push_failures:
        print(f"the push of {', '.join(push_failures)} failed; the commands above retry it", file=sys.stderr)
        raise SystemExit(PUSH_FAILED)
    return results


def _rerun_command(recipe_dir, accelerate_config, overrides, results_path, evaluate, force, variant, jobs):
    """A function of the stages to run that writes the `pipeline run` command repeating every option the user
    gave (so that copying it reruns the same thing from those stages), quoted for the shell."""
    import shlex

    options = [*(["--accelerate_config", accelerate_config] if accelerate_config else []),
               *(["--results", str(results_path)] if results_path else []), *([] if evaluate else ["--skip_eval"]),
               *(["--force"] if force else []), *([f"--{variant}"] if variant else []),
               *(["--jobs", str(jobs)] if jobs is not None else []),
               *(["--debug"] if os.environ.get("PIPELINE_DEBUG", "") not in ("", "0") else []),
               *(["--", *overrides] if overrides else [])]
    return lambda stages: shlex.join(["python", "-m", "pipeline", "run", str(recipe_dir), "--stages", ",".join(stages),
                                      *options])


INPUT_FIELDS = ("model_name_or_path", "sft_model_path", "reward_model_path")


def model_inputs(parsed) -> dict[str, str]:
    """field -> path of the models a stage starts from or trains against (its parsed recipe's three dataclasses)."""
    return {field: value for args in parsed for field in INPUT_FIELDS
            if isinstance(value := getattr(args, field, None), str) and value}


def _written(folder: Path) -> float | None:
    """When a model folder's model was last written (its config and weights), or None when it holds none."""
    files = [folder / "config.json", folder / "adapter_config.json", *folder.glob("*.safetensors"),
             *folder.glob("*.bin")]
    times = [f.stat().st_mtime for f in files if f.is_file()]
    return max(times) if times else None


def stale_stages(inputs: dict[str, dict[str, str]], output_dirs: dict[str, str]) -> dict[str, str]:
    """stage -> why its figures are stale: its results.json is older than a model it starts from or trains
    against (e.g. sft rerun after reward and ppo finished: their figures describe models of the old SFT policy)."""
    stale = {}
    for stage, fields in inputs.items():
        results_file = Path(output_dirs[stage]) / "results.json"
        if not results_file.is_file():
            continue
        finished = results_file.stat().st_mtime
        for field, path in fields.items():
            written = _written(Path(path)) if os.path.isdir(path) else None
            if written is not None and written > finished:
                stamp = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))  # noqa: E731
                stale[stage] = (f"its figures are from a run of {stamp(finished)}, before its {field} {path} was "
                                f"written again ({stamp(written)})")
                break
    return stale


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_summary(results: dict, results_path: Path) -> None:
    stale = results.get("stale", {})
    mark = lambda stage: " (stale)" if stage in stale else ""  # noqa: E731
    rows = [(stage, key, _fmt(results[stage][key]) + mark(stage))
            for stage in [*STAGES, CEILING] if stage in results
            for key in HEADLINE[stage] + ["wall_seconds", "side_by_side_with"] if key in results[stage]]
    evaluation = results.get("eval", {})
    if "reward_model" in evaluation:
        rows.append(("eval", f"reward_model.accuracy ({evaluation['reward_model']['reference']})",
                     _fmt(evaluation["reward_model"]["accuracy"]) + mark("reward")))
    for stage, value in evaluation.get("perplexity", {}).items():
        rows.append(("eval", f"perplexity.{stage}", _fmt(value) + mark(stage)))
    for stage, by_k in evaluation.get("few_shot_sentiment", {}).items():
        rows.append(("eval", f"few_shot_sentiment.{stage}",
                     " ".join(f"{k}={_fmt(v)}" for k, v in by_k.items()) + mark(stage)))
    width = max(len(f"{s}.{k}") for s, k, _ in rows)
    print(f"\n{'result':<{width}}  value")
    for stage, key, value in rows:
        print(f"{stage + '.' + key:<{width}}  {value}")
    print(f"{'wall_seconds_total':<{width}}  {_fmt(results.get('wall_seconds_total'))}")
    for stage, why in stale.items():
        print(f"(stale) {stage}: {why}")
    for stage in [s for s in STAGE3 if s in results][:1]:  # a few answers of the first stage-3 policy
        for sample in results[stage].get("samples", [])[:3]:
            print(f"\nprompt: {sample['prompt']}\n  sft: {sample['sft'].strip()}\n  {stage}: {sample[stage].strip()}"
                  + (f"\n  (stale: {stage}'s answers are from before a stage it reads was run again)"
                     if stage in stale else ""))
    print(f"\nresults written to {results_path}")


def copy_recipe(name: str, dest: str) -> None:
    source = ROOT / "recipes" / name
    if not source.is_dir():
        raise FileNotFoundError(f"no recipe '{name}' in {ROOT / 'recipes'}")
    if os.path.exists(dest):
        raise FileExistsError(f"'{dest}' already exists; choose a new folder")
    shutil.copytree(source, dest)
    print(f"copied {source} -> {dest}")


def _model_arguments(parser):
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")


def _decoding_arguments(parser):
    from .decoding import STRATEGIES, Decoding

    defaults = Decoding()
    parser.add_argument("--strategy", choices=STRATEGIES, default=defaults.strategy)
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    # None: not given (the strategy's default applies); a sampling flag given with greedy or beam is refused
    parser.add_argument("--temperature", type=float, help=f"with --strategy sample (default {defaults.temperature})")
    parser.add_argument("--top_k", type=int, help="with --strategy sample; 0: no top-k filter (the default)")
    parser.add_argument("--top_p", type=float, help="with --strategy sample; 1: no top-p filter (the default)")
    parser.add_argument("--num_beams", type=int, help=f"with --strategy beam (default {defaults.num_beams})")
    parser.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--seed", type=int, default=0)


def _policy_arguments(parser):
    parser.add_argument("--dataset", default="embedded:prompt", help="prompts: Hub id, local file or embedded:prompt")
    parser.add_argument("--split", default="test")
    parser.add_argument("--reward_model", help="reward model to score the answers with")
    parser.add_argument("--max_prompts", type=int, default=None)
    parser.add_argument("--samples_per_prompt", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)


def _load(args, path: str, kind: str = "lm", padding_side: str = "left", field: str = "MODEL"):
    """(model in eval mode, tokenizer); the checkpoint must be a causal LM (kind "lm") or a reward model."""
    from trl import ModelConfig

    from .models import CAUSAL_LM, SCALAR_HEAD, load_causal_lm, load_scalar_head_model, load_tokenizer

    model_args = ModelConfig(model_name_or_path=path, dtype=getattr(args, "dtype", None))
    # before the tokenizer: a checkpoint of another kind may have none, and the kind is the message to give
    _check_kind(path, CAUSAL_LM if kind == "lm" else SCALAR_HEAD, field, model_args)
    tokenizer = load_tokenizer(path, model_args, padding_side=padding_side)
    if kind == "lm":
        return load_causal_lm(path, tokenizer, model_args, field).eval(), tokenizer
    return load_scalar_head_model(path, tokenizer, model_args, field).eval(), tokenizer


def _split(name: str, split: str, use: str):
    from . import data

    train, test, source = data.load_splits(name, test_split=split)
    rows = test if test is not None else train
    return data.normalise(rows, use, f"{source} [{split if test is not None else 'train'}]")


def evaluate_command(args, overrides: list[str]) -> dict:
    """The `eval` subcommands; returns the JSON-able result."""
    from . import embedded, evaluate
    from .embedded.fewshot import sentiment_task

    oracle = embedded.ORACLE if getattr(args, "dataset", "").startswith("embedded:") else None
    if args.what == "suite":
        from .suite import evaluate_run

        _check_recipe_dir(args.recipe_dir, "eval suite")
        return evaluate_run(args.recipe_dir, overrides, variant=LORA if args.lora else None)
    _check_dtype(args.dtype)
    if args.what in ("policy", "compare"):
        return _evaluate_policies(args, oracle)
    _check_model_path(args.model, "MODEL")
    if args.what == "reward":
        model, tokenizer = _load(args, args.model, "reward", padding_side="right")
        return evaluate.evaluate_reward_model(model, tokenizer, _split(args.dataset, args.split, "preference"),
                                              oracle=oracle)
    _check_at_least(args, 1, "max_texts", "examples")
    if args.what == "fewshot":
        try:
            shots = [int(k) for k in args.shots.split(",")]
        except ValueError:
            raise ValueError(f"--shots must be comma-separated integers, e.g. 0,1,2, got {args.shots!r}") from None
        if min(shots) < 0:
            raise ValueError(f"--shots must be 0 or more (demonstrations before each question), got {args.shots!r}")
    model, tokenizer = _load(args, args.model, padding_side="right")
    if args.what == "perplexity":
        texts = _split(args.dataset, args.split, "text")["text"][: args.max_texts]
        return {"perplexity": evaluate.perplexity(model, tokenizer, texts), "texts": len(texts)}
    return evaluate.few_shot_accuracy(model, tokenizer, sentiment_task(args.seed, args.examples), shots)


def _evaluate_policies(args, oracle) -> dict:
    """`eval policy` and `eval compare`: every setting, every model's kind and every tokenizer checked before any
    model's weights are loaded; the lengths checked against each model's context before anything is generated."""
    from . import evaluate
    from .models import CAUSAL_LM, SCALAR_HEAD, first_tokenizer_difference, load_tokenizer

    _check_at_least(args, 1, "max_prompts", "samples_per_prompt", "max_new_tokens")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be greater than 0, got {args.temperature} (it divides the logits; "
                         "for nearly greedy answers use a small value such as 0.01)")
    models = [(path, need, field) for path, need, field in (
        (args.model, CAUSAL_LM, "MODEL"), (getattr(args, "other", None), CAUSAL_LM, "OTHER"),
        (getattr(args, "reference", None), CAUSAL_LM, "--reference"),
        (args.reward_model, SCALAR_HEAD, "--reward_model")) if path]
    for path, need, field in models:  # every model's kind before any is loaded
        _check_model_path(path, field)
        _check_kind(path, need, field)
    from trl import ModelConfig

    tokenizers = {field: load_tokenizer(path, ModelConfig(model_name_or_path=path)) for path, _, field in models}
    for path, _, field in models[1:]:  # one tokenizer: the policy's ids are what the others read
        difference = first_tokenizer_difference(tokenizers["MODEL"], tokenizers[field])
        if difference:
            raise ValueError(f"{field} '{path}' has another tokenizer than MODEL '{args.model}' (its {difference} "
                             "differs): it would read the policy's token ids as other words, and its scores, "
                             "log-probabilities and KL would be meaningless; give models trained from the same "
                             "tokenizer (the same pretrain stage)")
    policy, tokenizer = _load(args, args.model)
    prompts = list(_split(args.dataset, args.split, "prompt")["prompt"])[: args.max_prompts]
    longest = evaluate.encode_prompts(tokenizer, prompts).shape[1]
    loaded = {"MODEL": policy}
    if args.reward_model:
        loaded["--reward_model"] = _load(args, args.reward_model, "reward", field="--reward_model")[0]
    if getattr(args, "reference", None):
        loaded["--reference"] = _load(args, args.reference, field="--reference")[0]
    if getattr(args, "other", None):
        loaded["OTHER"] = _load(args, args.other, field="OTHER")[0]
    paths = {field: path for path, _, field in models}
    for field, model in loaded.items():
        _check_lengths(model, tokenizer, field, paths[field], longest, args.max_new_tokens)
    common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, oracle=oracle,
                  samples_per_prompt=args.samples_per_prompt, seed=args.seed)
    if args.what == "policy":
        return evaluate.evaluate_policy(policy, tokenizer, prompts, reward_model=loaded.get("--reward_model"),
                                        reference=loaded.get("--reference"), **common)
    return evaluate.compare_policies(policy, loaded["OTHER"], loaded.get("--reward_model"), tokenizer, prompts,
                                     names=("a", "b"), **common)


def _check_lengths(model, tokenizer, field: str, path: str, longest: int, max_new_tokens: int) -> None:
    """A model with absolute position embeddings (GPT-2's wpe, OPT's) cannot read past its last position (an
    IndexError deep in torch): refuse prompts + --max_new_tokens longer than that, naming the numbers."""
    import torch

    from .decoding import context_length

    absolute = any(isinstance(module, torch.nn.Embedding) and name.endswith(("wpe", "embed_positions",
                                                                             "position_embeddings"))
                   for name, module in model.named_modules())
    context = context_length(model, tokenizer)
    if not absolute or context is None or longest + max_new_tokens <= context:
        return
    fix = (f"use --max_new_tokens {context - longest} or less" if context > longest
           else "the longest prompt alone fills it: use shorter prompts (another --dataset)")
    raise ValueError(f"--max_new_tokens {max_new_tokens} does not fit {field} '{path}': the longest prompt "
                     f"({longest} tokens) and {max_new_tokens} new tokens need {longest + max_new_tokens} positions, "
                     f"and the model has {context} (absolute position embeddings); {fix}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run_parser = commands.add_parser("run", help="run every stage of a recipe folder in order, then evaluate")
    run_parser.add_argument("recipe_dir")
    run_parser.add_argument("--stages", help="comma-separated, e.g. reward,ppo or sft,reward,grpo,dpo; `all`: every "
                            "stage with a recipe (default: pretrain,sft,reward,ppo)")
    run_parser.add_argument("--accelerate_config", help="launch each stage with `accelerate launch --config_file`")
    run_parser.add_argument("--results", help="results file (default: results.json beside the stage outputs)")
    run_parser.add_argument("--skip_eval", action="store_true", help="do not run the evaluation suite after")
    run_parser.add_argument("--force", action="store_true", help="rerun stages that already finished")
    run_parser.add_argument("--lora", action="store_true",
                            help="run the stages that have a LoRA recipe (<stage>-lora.yaml), from those recipes")
    run_parser.add_argument("--jobs", type=int, default=None,
                            help="how many stages may run at once, side by side (only those that read no output "
                                 "of each other: the stage-3 algorithms and ppo-oracle), torch's CPU threads split "
                                 "between them (default: 2 on the CPU without --accelerate_config, else 1)")

    from .compare import ALGORITHMS, SEEDS

    compare_parser = commands.add_parser("compare", help="PPO, GRPO, RLOO, DPO and oracle-reward PPO over seeds: "
                                         "bench/results/comparison.md and .json, plots")
    compare_parser.add_argument("--recipes", default="recipes/tiny", help="the recipe folder (default recipes/tiny)")
    compare_parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
    compare_parser.add_argument("--algorithms", help="comma-separated subset of " + ", ".join(ALGORITHMS)
                                + " (default: every one whose recipe the folder has)")
    compare_parser.add_argument("--output_dir", default="outputs/compare", help="where the runs go")
    compare_parser.add_argument("--markdown", default="bench/results/comparison.md",
                                help="the table (and .json beside it; default bench/results/comparison.md)")
    compare_parser.add_argument("--plots_dir", default="docs/comparison", help="where the two plots go")
    compare_parser.add_argument("--accelerate_config", help="launch each run with `accelerate launch --config_file`")
    compare_parser.add_argument("--force", action="store_true", help="rerun the runs that already finished")
    compare_parser.add_argument("--note", help="a sentence for comparison.md on how it was measured (e.g. a shared "
                                "machine)")

    eval_parser = commands.add_parser("eval", help="evaluate checkpoints (local folders or Hub ids)")
    eval_parser.add_argument("--output", help="also write the JSON result to this file")
    what = eval_parser.add_subparsers(dest="what", required=True)
    suite = what.add_parser("suite", help="everything the pipeline evaluates after a run of RECIPE_DIR")
    suite.add_argument("recipe_dir")
    suite.add_argument("--lora", action="store_true", help="the models of the LoRA recipes (<stage>-lora.yaml)")
    policy = what.add_parser("policy", help="a policy's answers: RM/gold score, KL, length, EOS, distinct-n")
    policy.add_argument("model")
    policy.add_argument("--reference", help="reference policy for the KL")
    _policy_arguments(policy)
    compare = what.add_parser("compare", help="win rate of policy A against policy B on the same prompts")
    compare.add_argument("model")
    compare.add_argument("other")
    _policy_arguments(compare)
    reward = what.add_parser("reward", help="a reward model on preference pairs: accuracy, margin, scores")
    reward.add_argument("model")
    reward.add_argument("--dataset", default="embedded:preference")
    reward.add_argument("--split", default="test")
    ppl = what.add_parser("perplexity", help="perplexity of a causal LM on held-out text")
    ppl.add_argument("model")
    ppl.add_argument("--dataset", default="embedded:corpus")
    ppl.add_argument("--split", default="test")
    ppl.add_argument("--max_texts", type=int, default=None)
    fewshot = what.add_parser("fewshot", help="zero/one/few-shot accuracy on the embedded sentiment task")
    fewshot.add_argument("model")
    fewshot.add_argument("--shots", default="0,1,2")
    fewshot.add_argument("--examples", type=int, default=100)
    fewshot.add_argument("--seed", type=int, default=0)
    for sub in (suite, policy, compare, reward, ppl, fewshot):
        if sub is not suite:
            _model_arguments(sub)
        # also after the subcommand (`eval policy M --output F`); SUPPRESS keeps a value given before it
        sub.add_argument("--output", default=argparse.SUPPRESS, help="also write the JSON result to this file")

    generate = commands.add_parser("generate", help="answer prompts with a model")
    generate.add_argument("model")
    generate.add_argument("prompts", nargs="+")
    generate.add_argument("--no_chat", action="store_true", help="continue the raw text, no chat template")
    _decoding_arguments(generate)
    _model_arguments(generate)
    chat = commands.add_parser("chat", help="talk to a model in its chat template")
    chat.add_argument("model")
    _decoding_arguments(chat)
    _model_arguments(chat)

    push = commands.add_parser("push", help="push a stage's output folder to the Hub (or retry a failed push)")
    push.add_argument("output_dir")
    push.add_argument("--repo_id", required=True)
    push.add_argument("--revision")
    push.add_argument("--private", action="store_true", default=None)

    merge = commands.add_parser("merge", help="merge a LoRA adapter folder into its base model")
    merge.add_argument("adapter_dir", help="a folder with adapter_config.json, e.g. outputs/tiny-lora/sft/adapter")
    merge.add_argument("output_dir")
    merge.add_argument("--base_model", help="the base model (default: the one named in adapter_config.json)")
    merge.add_argument("--dtype", default="auto", help="float32, bfloat16, ... (default: the base model's)")

    commands.add_parser("ls", help="list the shipped recipes")
    cp_parser = commands.add_parser("cp", help="copy a shipped recipe folder to edit it")
    cp_parser.add_argument("name")
    cp_parser.add_argument("dest")
    return parser


SAMPLING_FLAGS = ("temperature", "top_k", "top_p")


def _decoding(args):
    """The decoding settings of `generate`/`chat`, checked before any model is loaded: every value in its range,
    and no flag that the chosen strategy would ignore."""
    from .decoding import Decoding

    given = {name: getattr(args, name) for name in (*SAMPLING_FLAGS, "num_beams") if getattr(args, name) is not None}
    ignored = [name for name in given if args.strategy != ("beam" if name == "num_beams" else "sample")]
    if ignored:
        name = ignored[0]
        needs = "beam" if name == "num_beams" else "sample"
        raise ValueError(f"--{name} {given[name]} applies to --strategy {needs} only, and this is --strategy "
                         f"{args.strategy}, which would ignore it: add --strategy {needs} or leave --{name} out")
    return Decoding(strategy=args.strategy, max_new_tokens=args.max_new_tokens,
                    repetition_penalty=args.repetition_penalty, **given).check()


def _check_dtype(value: str | None, flag: str = "--dtype") -> None:
    """A --dtype must name a torch dtype (or auto); torch would fail with an AttributeError deep in loading."""
    if value in (None, "auto"):
        return
    import torch

    if not isinstance(getattr(torch, value, None), torch.dtype):
        raise ValueError(f"{flag} {value} is not a torch dtype: use auto (the checkpoint's), float32, bfloat16 or "
                         "float16")


def _check_at_least(args, low: int, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ValueError(f"--{name} must be at least {low}, got {value}")


def _check_model_path(path: str, field: str) -> None:
    """A model is a folder (a stage's output_dir) or a Hub id, never a file: name a file as such (transformers
    would call it an invalid repo id)."""
    if os.path.isfile(path):
        raise ValueError(f"{field} '{path}' is a file; a model is the folder that holds it (e.g. "
                         f"'{os.path.dirname(path) or '.'}', a stage's output_dir) or a Hub id")


def _check_recipe_dir(path: str, command: str) -> None:
    """`run`, `eval suite` and `compare --recipes` take a recipe folder: name a recipe file, or any file, as such."""
    if os.path.isdir(path):
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"recipe folder '{path}' does not exist (see `python -m pipeline ls`)")
    name = Path(path)
    if name.suffix not in (".yaml", ".yml"):
        raise ValueError(f"'{path}' is a file; {command} takes a recipe folder (e.g. recipes/tiny: "
                         "`python -m pipeline ls` lists them)")
    stem = name.stem.removesuffix(f"-{LORA}")
    script = f"scripts/{script_of(stem)}.py" if stem in (*STAGES, CEILING) else "scripts/<stage>.py"
    raise ValueError(f"'{path}' is a recipe file; {command} takes the recipe folder ('{name.parent}'); to run this "
                     f"one recipe alone: python {script} --config {path}")


def _check_kind(path: str, need: str, field: str, model_args=None) -> None:
    """models.check_model_kind, with the field named where a path that is not a local folder cannot be fetched
    from the Hub either (transformers' message names neither)."""
    from .models import check_model_kind

    try:
        check_model_kind(path, need, field, model_args)
    except OSError as error:
        if str(error).startswith(field) or os.path.exists(path):
            raise
        cause = " ".join(str(error).split()).split(". ")[0]
        raise OSError(f"{field} '{path}' is not a local folder, and as a Hub id it could not be loaded ({cause}): "
                      "check the path (a stage's output_dir) or the Hub id and the connection") from None


def _check_file_arg(path: str | None, flag: str, example: str) -> None:
    """A flag that takes a file must not be given a folder."""
    if path and os.path.isdir(path):
        raise ValueError(f"{flag} '{path}' is a folder; {flag} takes a file ({example})")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    if "--debug" in argv:  # anywhere before `--`: tracebacks instead of one-line errors, here and in every stage
        argv = [a for a in argv if a != "--debug"]
        os.environ["PIPELINE_DEBUG"] = "1"
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            run(args.recipe_dir, args.stages.split(",") if args.stages else None, args.accelerate_config,
                overrides, args.results, evaluate=not args.skip_eval, force=args.force,
                variant=LORA if args.lora else None, jobs=args.jobs)
        elif args.command == "compare":
            from .compare import compare

            _check_recipe_dir(args.recipes, "compare --recipes")
            _check_file_arg(args.accelerate_config, "--accelerate_config", "e.g. recipes/accelerate/multi_gpu.yaml")
            try:
                seeds = [int(seed) for seed in args.seeds.split(",")]
            except ValueError:
                raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
            compare(args.recipes, seeds, args.algorithms.split(",") if args.algorithms else None, args.output_dir,
                    args.markdown, args.plots_dir, overrides, args.accelerate_config, args.force, args.note)
        elif args.command == "eval":
            _check_file_arg(args.output, "--output", "the JSON result, e.g. eval.json")
            result = evaluate_command(args, overrides)
            text = json.dumps(result, indent=2, sort_keys=True)
            print(text)
            if args.output:
                Path(args.output).write_text(text)
        elif args.command in ("generate", "chat"):
            import torch

            from .decoding import chat, generate

            decoding = _decoding(args)  # every setting checked before the model is loaded
            _check_dtype(args.dtype)
            _check_model_path(args.model, "MODEL")
            torch.manual_seed(args.seed)
            model, tokenizer = _load(args, args.model)
            if args.command == "chat":
                chat(model, tokenizer, decoding)
            else:
                inputs = args.prompts if args.no_chat else [[{"role": "user", "content": p}] for p in args.prompts]
                for prompt, answer in zip(args.prompts, generate(model, tokenizer, inputs, decoding)):
                    print(f"prompt: {prompt}\nanswer: {answer}\n")
        elif args.command == "push":
            from .hub import push_command

            if os.path.isfile(args.output_dir):
                raise ValueError(f"OUTPUT_DIR '{args.output_dir}' is a file; push takes a stage's output folder "
                                 f"(e.g. '{os.path.dirname(args.output_dir) or '.'}')")
            sys.exit(push_command(args.output_dir, args.repo_id, args.revision, args.private))
        elif args.command == "merge":
            from .models import merge_adapter

            _check_dtype(args.dtype)
            _check_model_path(args.adapter_dir, "ADAPTER_DIR")
            if os.path.isfile(args.output_dir):
                raise ValueError(f"OUTPUT_DIR '{args.output_dir}' is a file; merge writes a new folder: give it one "
                                 "that does not exist or is empty")
            merge_adapter(args.adapter_dir, args.output_dir, base_model=args.base_model, dtype=args.dtype)
            print(f"merged {args.adapter_dir} into {args.output_dir}")
        elif args.command == "ls":
            folders = sorted(p for p in (ROOT / "recipes").iterdir() if p.is_dir())
            width = max(len(folder.name) for folder in folders)
            for folder in folders:
                print(f"{folder.name:<{width}}  {' '.join(sorted(f.name for f in folder.glob('*.yaml')))}")
        else:
            copy_recipe(args.name, args.dest)
    except Stopped as stop:
        name = "Ctrl-C" if stop.signum == signal.SIGINT else signal.Signals(stop.signum).name
        print(f"\n{args.command}: stopped by {name}; what was written is kept (the stages that were running wrote a "
              "checkpoint at the step they reached) and the same command resumes", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt:
        if os.environ.get("PIPELINE_DEBUG", "") not in ("", "0"):
            raise
        print(f"\nerror: {args.command}: interrupted (Ctrl-C); what was already written is kept", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as error:
        if os.environ.get("PIPELINE_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
