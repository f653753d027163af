"""`make bench`: the pipeline's stages against bare TRL, side by side, on this machine.

    python bench/run.py            # the full benchmark (about 10 minutes on 2 CPU cores)
    python bench/run.py --quick    # a smoke run: tiny steps, 1 repeat (well under a minute)

Writes bench/results/stages.md and stages.json (--md / --json to choose). Sections: SFT (ours vs
bare TRL, and packing), reward (ours vs bare TRL), data preparation on a rerun. PPO is benchmarked by
bench/ppo_vs_trl112.py instead (our PPOTrainer against TRL 1.12's, the last TRL with one: bench/results/ppo.md).

Method: every measured run is its own child process (forked from a server that has imported torch,
transformers, trl, datasets and accelerate once); the compared configurations get the same model, the same
data file and the same TRL config, and are interleaved (A B C, C B A, A B C, ...) so that load from other
processes on the machine and drift hit all of them alike; a run that shared the CPU with another process is
measured again. Repeat r of every configuration uses seed 42 + r. Reported: the
median over repeats with the spread (min-max), and ratios of medians with the spread of the per-repeat
(paired) ratios. Throughput is timed over the `train()` call only (process start, imports, data and model
loading are excluded and reported separately).
"""

import argparse
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import yaml  # noqa: E402

from bench import report, workers  # noqa: E402

RECIPES = os.path.join(ROOT, "recipes", "tiny")


# ------------------------------------------------------------------------------------------------ settings

def settings(quick: bool) -> dict:
    """Run lengths. Tens of optimizer steps per run in the full benchmark; one or two in --quick."""
    if quick:
        return dict(repeats=1, sft_rows=256, preference_rows=256, rerun_rows=3000, sft_steps=2, packed_steps=1,
                    reward_steps=2)
    return dict(repeats=3, sft_rows=2000, preference_rows=1500, rerun_rows=30000, sft_steps=40, packed_steps=10,
                reward_steps=30)


def recipes(s: dict) -> dict:
    """recipes/tiny as the benchmark runs them (before the per-configuration overrides)."""
    return {stage: yaml.safe_load(open(os.path.join(RECIPES, f"{stage}.yaml"))) for stage in ("sft", "reward")}


def matched_batch(lengths: dict) -> int:
    """Packed rows are about max_length long: this many packed rows hold as many examples as a padded batch."""
    return max(1, round(lengths["padding_share_at_batch"] * lengths["mean"] / lengths["max_length"]))


def packed_configurations(s: dict, lengths: dict) -> list:
    """bfd packing in the pipeline's rows layout (its default without flash attention) and in TRL's flattened
    layout, at the batch of packed rows that holds a padded batch's examples."""
    matched = matched_batch(lengths)
    packed = {"max_steps": s["sft_steps"], "packing": True, "packing_strategy": "bfd",
              "per_device_train_batch_size": matched}
    return [
        (f"ours + packing bfd, batch {matched}", "ours", packed,
         f"packing: true, packing_strategy: bfd, {matched} packed rows of max_length per batch (about the examples "
         "of a padded batch of 32), in the pipeline's rows layout (`packed_batch_layout: auto` = rows without "
         "flash attention: each packed row a row of the batch, its examples kept apart by position_ids)"),
        (f"ours + packing bfd flat, batch {matched}", "ours", {**packed, "packed_batch_layout": "flat"},
         "as above in TRL's padding-free layout (`packed_batch_layout: flat`: the whole batch flattened into one "
         "row, as TRL's collator does)"),
    ]


def configurations(s: dict, prep: dict) -> dict:
    """{section: [(name, impl, recipe overrides, what)]}. The first row of a section is its reference."""
    return {
        "sft": [
            ("ours", "ours", {"max_steps": s["sft_steps"]},
             "pipeline SFT stage, recipes/tiny/sft.yaml (padding to the longest row of each batch of 32)"),
            ("bare TRL", "bare", {"max_steps": s["sft_steps"]},
             "bench/bare_sft.py: SFTTrainer with the same SFTConfig"),
            *packed_configurations(s, prep["sft_lengths"]),
            ("ours + group_by_length", "ours",
             {"max_steps": s["sft_steps"], "train_sampling_strategy": "group_by_length"},
             "train_sampling_strategy: group_by_length (padding, but batches of similar lengths; no packing)"),
            ("ours + packing wrapped", "ours",
             {"max_steps": s["packed_steps"], "packing": True, "packing_strategy": "wrapped"},
             "packing_strategy: wrapped (rows of max_length cut across examples; no padding)"),
        ],
        "sft-varlen": [
            ("ours", "ours", {"max_steps": s["sft_steps"]},
             "pipeline SFT stage, recipes/tiny/sft.yaml on the multi-turn rows (padding to the longest row of each "
             "batch of 32)"),
            *packed_configurations(s, prep["sft_varlen_lengths"]),
        ],
        "reward": [
            ("ours", "ours", {"max_steps": s["reward_steps"]},
             "pipeline reward stage, recipes/tiny/reward.yaml"),
            ("bare TRL", "bare", {"max_steps": s["reward_steps"]},
             "bench/bare_reward.py: RewardTrainer with the same RewardConfig"),
        ],
    }


def write_recipe(work: str, stage: str, name: str, repeat: int, overrides: dict, prep: dict) -> str:
    """recipes/tiny/<stage>.yaml with the bench's data file, models, a fresh output folder and `overrides`."""
    recipe = yaml.safe_load(open(os.path.join(RECIPES, f"{stage.split('-')[0]}.yaml")))
    models, data = prep["models"], prep["data"]
    slug = "".join(c if c.isalnum() else "-" for c in name)
    recipe.update(output_dir=os.path.join(work, "runs", f"{stage}-{slug}-{repeat}"), seed=42 + repeat,
                  report_to="none", save_strategy="no", disable_tqdm=True)
    if stage == "sft":
        recipe.update(dataset_name=data["sft"], model_name_or_path=models["lm"])
    elif stage == "sft-varlen":
        recipe.update(dataset_name=data["sft_varlen"], model_name_or_path=models["lm"])
    elif stage == "sft-rerun":
        recipe.update(dataset_name=data["sft_rerun"], model_name_or_path=models["lm"])
    elif stage == "reward":
        recipe.update(dataset_name=data["preference"], model_name_or_path=models["reward_init"])
    else:
        raise ValueError(f"unknown bench stage {stage!r}")
    if stage.startswith("sft"):  # TRL's own LM head, as bare TRL: the two train exactly the same thing (the
        recipe["lm_head"] = "tiled"  # pipeline's CPU default, the whole logits, is measured by bench/lm_head.py)
    recipe.update(overrides)
    path = os.path.join(work, "recipes", f"{stage}-{slug}-{repeat}.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path, recipe["output_dir"]


def rerun_section(runner, work: str, s: dict, prep: dict, say) -> dict:
    """SFT on a larger file with datasets' cache on: a first run (empty cache), then a rerun of the same recipe
    (the first run's cache), ours and bare TRL, one training step each: what a rerun or a resumed run prepares
    again. The first run and its rerun stay in order; the two implementations alternate from repeat to repeat."""
    runs = {"ours": [], "bare TRL": []}
    for repeat in range(s["repeats"]):
        for name in (["ours", "bare TRL"] if repeat % 2 == 0 else ["bare TRL", "ours"]):
            impl = "ours" if name == "ours" else "bare"
            cache = os.path.join(work, "rerun-cache", f"{impl}-{repeat}")
            pair = {}
            for attempt in ("first", "rerun"):
                recipe, output_dir = write_recipe(work, "sft-rerun", f"{name} {attempt}", repeat, {"max_steps": 1},
                                                  prep)
                pair[attempt] = runner({"kind": "sft-cache", "impl": impl, "recipe": recipe, "cache_dir": cache},
                                       measured=True)
                shutil.rmtree(output_dir, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
            runs[name].append({"first_setup_s": pair["first"]["setup_s"], "rerun_setup_s": pair["rerun"]["setup_s"],
                               "other_load_cores": max(pair[a]["other_load_cores"] for a in pair), "repeat": repeat})
            say(f"rerun  {name:30s} {repeat + 1}/{s['repeats']}: setup {pair['first']['setup_s']:.1f} s first, "
                f"{pair['rerun']['setup_s']:.1f} s rerun")
    return {"rows": s["rerun_rows"], "runs": runs}


# ------------------------------------------------------------------------------------------------ children

def cpu_seconds() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot, summed over CPUs (/proc/stat)."""
    values = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / hz, idle / hz


def busy_cores(seconds: float) -> float:
    """How many cores the machine keeps busy over the next `seconds` (nothing of ours runs meanwhile)."""
    before = cpu_seconds()[0]
    time.sleep(seconds)
    return (cpu_seconds()[0] - before) / seconds


class Runner:
    """Runs jobs one at a time, each in a fresh child of the fork server. Before a measured run it waits (up to
    `gate_s` per run and `gate_budget_s` in all) for the rest of the machine to be quiet; during the run it
    measures the other processes' CPU use (the machine's busy CPU time minus the child's own). A run that shared
    the CPU is measured again, within `retry_budget_s` of reruns in all."""

    QUIET = 0.25  # cores used by other processes that still count as a quiet machine

    def __init__(self, work: str, timeout: float, gate_s: float, gate_budget_s: float, retry_budget_s: float):
        self.work, self.timeout = work, timeout
        self.gate_s, self.gate_budget_s = gate_s, gate_budget_s
        self.retry_budget_s, self.retried_s = retry_budget_s, 0.0
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(workers.PRELOAD)
        self.count = 0
        self.waited_s = 0.0

    def may_retry(self, cost_s: float) -> bool:
        """Whether a disturbed run may be measured again (within `retry_budget_s` of reruns in all)."""
        if self.retry_budget_s - self.retried_s < cost_s:
            return False
        self.retried_s += cost_s
        return True

    def wait_for_quiet(self) -> float:
        start = time.perf_counter()
        while self.gate_s > 0:
            if busy_cores(0.5) < self.QUIET:
                break
            waited = time.perf_counter() - start
            if waited >= self.gate_s or self.waited_s + waited >= self.gate_budget_s:
                break
            time.sleep(1.5)
        waited = time.perf_counter() - start
        self.waited_s += waited
        return waited

    def __call__(self, job: dict, measured: bool = False) -> dict:
        self.count += 1
        waited = self.wait_for_quiet() if measured else 0.0
        job = dict(job, log=os.path.join(self.work, "logs", f"{self.count:03d}-{job['kind']}.log"))
        receive, send = self.context.Pipe(duplex=False)
        busy_before, start = cpu_seconds()[0], time.perf_counter()
        process = self.context.Process(target=workers.child_main, args=(job, send))
        process.start()
        send.close()
        if receive.poll(self.timeout):
            try:
                result = receive.recv()
            except EOFError:
                result = {"error": "the child exited without a result"}
        else:
            process.kill()
            result = {"error": f"timed out after {self.timeout:.0f} s"}
        process.join()
        wall, busy = time.perf_counter() - start, cpu_seconds()[0] - busy_before
        if "error" in result:
            tail = open(job["log"]).read()[-4000:]
            raise SystemExit(f"bench: {job['kind']} failed: {result['error']}\n--- {job['log']} (tail) ---\n{tail}")
        if measured:
            result["other_load_cores"] = max(0.0, (busy - result["cpu_s"]) / wall)
            result["waited_for_quiet_s"] = waited
        return result


def start_server(runner: Runner) -> float:
    """Start the fork server (it imports the shared stack once) with a trivial job; its wall time."""
    start = time.perf_counter()
    runner({"kind": "noop"})
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ machine

def machine() -> dict:
    def read(path):
        try:
            return open(path).read()
        except OSError:
            return ""

    cpuinfo = read("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    meminfo = {line.split(":")[0]: line.split(":")[1].strip() for line in read("/proc/meminfo").splitlines()
               if ":" in line}
    memory_kb = int(meminfo.get("MemTotal", "0 kB").split()[0])
    cgroup = read("/sys/fs/cgroup/cpu.max").strip()
    versions = {}
    for package in ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": models[0] if models else platform.processor(),
        "logical_cpus": len(models) or os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cgroup_cpu_max": cgroup or None,
        "memory_gib": round(memory_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "gpu": None,
    }


def load_average() -> list[float]:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny steps, 1 repeat")
    parser.add_argument("--repeats", type=int, help="repeats per configuration (default 3; 1 with --quick)")
    parser.add_argument("--fresh-models", action="store_true",
                        help="do not use outputs/tiny: create an untrained tiny GPT-2 and tokenizer")
    parser.add_argument("--md", default=os.path.join(ROOT, "bench", "results", "stages.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "stages.json"))
    parser.add_argument("--workdir", help="keep the runs' recipes, logs and outputs here (default: a temp folder, "
                                          "removed at the end)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run before it is killed")
    parser.add_argument("--wait-for-quiet", type=float, default=20,
                        help="before each measured run, wait up to this many seconds for other processes to leave "
                             "the CPU (not with --quick)")
    parser.add_argument("--wait-budget", type=float, default=180, help="total seconds of such waiting")
    parser.add_argument("--retry-budget", type=float, default=180,
                        help="total seconds of measuring again runs that shared the CPU with other processes "
                             "(not with --quick)")
    parser.add_argument("--from-json", metavar="JSON",
                        help="measure nothing: write the Markdown again from a previous run's JSON (after a change "
                             "to the report's text or verdicts)")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            summary = json.load(f)
        summary["targets"] = report.targets(summary)
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=False)
        with open(args.md, "w") as f:
            f.write(report.markdown(summary))
        print(f"wrote {os.path.relpath(args.md)} and {os.path.relpath(args.json)} from {args.from_json}")
        return

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    s = settings(args.quick)
    if args.repeats:
        s["repeats"] = args.repeats
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench-"))
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    os.environ["HF_DATASETS_CACHE"] = os.path.join(work, "hf-datasets")  # before the fork server imports datasets
    began, wall_start = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    info = {"machine": machine(), "load_average_start": load_average(), "settings": s,
            "mode": "quick" if args.quick else "full", "date": began.strftime("%Y-%m-%d %H:%M UTC"),
            "recipes": recipes(s)}

    def say(message):
        print(f"[{time.perf_counter() - wall_start:6.1f}s] {message}", flush=True)

    try:
        runner = Runner(work, args.timeout, gate_s=0 if args.quick else args.wait_for_quiet,
                        gate_budget_s=args.wait_budget, retry_budget_s=0 if args.quick else args.retry_budget)
        say("starting the fork server (imports torch, transformers, trl once)")
        info["server_start_s"] = start_server(runner)
        say("preparing data and models")
        prep = runner({"kind": "prepare", "work": work, "recipe_dir": RECIPES, "fresh_models": args.fresh_models,
                       "sft_rows": s["sft_rows"], "preference_rows": s["preference_rows"],
                       "rerun_rows": s["rerun_rows"]})
        info["prepare"] = {k: v for k, v in prep.items() if k not in ("data", "models", "run_s", "peak_rss_mb")}
        say(f"models: {prep['model_source']}")
        say("checking padding-free correctness (padded vs flattened forward)")
        info["padding_free_check"] = runner({"kind": "check_padding_free", "work": work, "model": prep["models"]["lm"],
                                             "data": prep["data"]["sft"]})

        sections = {}
        for section, rows in configurations(s, prep).items():
            runs = {name: [] for name, *_ in rows}
            # a discarded warm-up run of the section's first configuration (file cache, lazy imports, allocator)
            name, impl, overrides, _ = rows[0]
            recipe, output_dir = write_recipe(work, section, name, 99, overrides, prep)
            heldout = prep["data"]["sft_varlen_heldout" if section == "sft-varlen" else "sft_heldout"]
            runner({"kind": section, "impl": impl, "recipe": recipe, "heldout": heldout})
            shutil.rmtree(output_dir, ignore_errors=True)
            say(f"{section:6s} warm-up run done")
            for repeat in range(s["repeats"]):
                order = rows if repeat % 2 == 0 else rows[::-1]  # A B C, C B A, A B C, ...
                for name, impl, overrides, _ in order:
                    recipe, output_dir = write_recipe(work, section, name, repeat, overrides, prep)
                    disturbed = []
                    job = {"kind": section, "impl": impl, "recipe": recipe, "heldout": heldout}
                    while True:
                        result = runner(job, measured=True)
                        shutil.rmtree(output_dir, ignore_errors=True)
                        if result["other_load_cores"] < report.LOADED or not runner.may_retry(result["run_s"]):
                            break
                        # another process shared the CPU: measure again once the machine is quiet
                        disturbed.append(result["other_load_cores"])
                        say(f"{section:6s} {name:30s} {repeat + 1}/{s['repeats']}: disturbed (other load "
                            f"{result['other_load_cores']:.2f} cores), measuring again")
                    result.update(repeat=repeat, disturbed_runs_discarded=disturbed)
                    runs[name].append(result)
                    say(f"{section:6s} {name:30s} {repeat + 1}/{s['repeats']}: " + report.headline(section, result))
            sections[section] = {"configurations": [{"name": name, "impl": impl, "overrides": overrides, "what": what}
                                                    for name, impl, overrides, what in rows],
                                 "runs": runs}
        info["sections"] = sections
        info["rerun"] = rerun_section(runner, work, s, prep, say)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    info["load_average_end"] = load_average()
    info["waited_for_quiet_s"] = runner.waited_s
    info["retried_s"] = runner.retried_s
    info["bench_wall_s"] = time.perf_counter() - wall_start
    summary = report.summarise(info)
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=False)
    with open(args.md, "w") as f:
        f.write(report.markdown(summary))
    say(f"wrote {os.path.relpath(args.md)} and {os.path.relpath(args.json)}")


if __name__ == "__main__":
    main()
