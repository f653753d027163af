"""One PPO run with the pipeline's PPOTrainer (`pipeline/trainers/ppo.py`), for bench/ppo_vs_trl112.py.

    .venv/bin/python bench/ours_ppo.py --recipe ppo.yaml --data train/ --result out.json

Runs the pipeline's PPO stage, `pipeline.stages.run("ppo", ["--config", recipe])`: exactly what `scripts/ppo.py`
does (load and check the prompts, tokenize them, load the four models, train, evaluate against the SFT policy,
save). The benchmark's recipe cuts the stage's own evaluation to 1 prompt x 1 sample: the policies are evaluated
afterwards, all alike, by bench/ppo_vs_trl112.py.

Timers, installed in this process only: the `PPOTrainer.train()` call; inside it `PPOTrainer._make_rollouts`
(an update's rollout: generation, then the scoring forward passes of the reference, value and reward models,
and the advantages) and `pipeline.rollout.generate` (generation). Scoring = the rollouts minus generation; what
is left of `train()` is the PPO epochs (and the Trainer's loop around them). The peak RSS (ru_maxrss) is read
right after `train()` returns (models, data and training; not the evaluation and the save). The stage's
tokenized prompts are checked against the benchmark's file (`--data`), which TRL 1.12's run trains on.
"""

import argparse
import importlib.metadata
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
now = time.perf_counter


def versions() -> dict:
    out = {}
    for package in ("torch", "transformers", "trl", "accelerate", "datasets", "peft"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="the PPO stage's recipe (YAML)")
    parser.add_argument("--data", required=True, help="the benchmark's tokenized training prompts, to compare")
    parser.add_argument("--result", required=True, help="write the measurements here (JSON)")
    parser.add_argument("--hide", action="append", default=[], metavar="PACKAGE",
                        help="make an installed package look absent in this process (importlib.util.find_spec "
                             "gives None): for a package the TRL 1.12 environment does not have, e.g. deepspeed, "
                             "which accelerate imports whenever it is installed")
    args = parser.parse_args(argv)
    for package in args.hide:
        sys.modules[package] = None  # find_spec -> None, import -> ImportError: as if not installed
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    started = now()

    import torch

    from pipeline import rollout
    from pipeline.trainers.ppo import PPOTrainer

    probe = {"inside": False, "trainer": None, "generation": 0.0, "rollouts": 0.0, "rss_mb": {}}

    def rss(point: str) -> None:  # the high-water mark so far, at a point of the run
        probe["rss_mb"][point] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def timed(function, bucket):
        def wrapper(*a, **k):
            if not probe["inside"]:
                return function(*a, **k)
            start = now()
            try:
                return function(*a, **k)
            finally:
                probe[bucket] += now() - start
        return wrapper

    rollout.generate = timed(rollout.generate, "generation")  # pipeline.trainers.ppo calls rollout.generate
    PPOTrainer._make_rollouts = timed(PPOTrainer._make_rollouts, "rollouts")
    original_init, original_train = PPOTrainer.__init__, PPOTrainer.train

    def init(trainer, *a, **k):
        rss("data and models loaded")
        original_init(trainer, *a, **k)
        rss("trainer built")

    PPOTrainer.__init__ = init

    def train(trainer, *a, **k):
        probe["trainer"], probe["inside"] = trainer, True
        probe["train_start"] = now()
        try:
            return original_train(trainer, *a, **k)
        finally:
            probe["train_end"] = now()
            probe["inside"] = False
            rss("train() returned")
            probe["peak_after_train"] = probe["rss_mb"]["train() returned"]

    PPOTrainer.train = train

    import pipeline.stages.ppo as stage

    original_main = stage.main

    def main_(*a, **k):  # everything imported, nothing loaded yet
        rss("imported")
        return original_main(*a, **k)

    stage.main = main_  # pipeline.stages.run calls the module's main
    from pipeline.stages import run

    run("ppo", ["--config", args.recipe])
    finished = now()

    trainer = probe["trainer"]
    if trainer is None or "train_end" not in probe:
        raise SystemExit("ours_ppo: the stage never called PPOTrainer.train()")
    from datasets import load_from_disk

    same_prompts = list(trainer.train_dataset["input_ids"]) == list(load_from_disk(args.data)["input_ids"])
    if not same_prompts:
        raise SystemExit(f"ours_ppo: the stage's tokenized prompts differ from {args.data}: the two "
                         "implementations would not train on the same data")

    config = trainer.args
    train_s = probe["train_end"] - probe["train_start"]
    scoring = probe["rollouts"] - probe["generation"]
    episodes = config.num_total_batches * config.batch_size
    logged = [h for h in trainer.state.log_history if "objective/scores" in h]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    simple = (int, float, str, bool, type(None))
    result = {
        "impl": "ours",
        "seed": config.seed,
        "train_s": train_s,
        "setup_s": probe["train_start"] - started,
        "after_s": finished - probe["train_end"],
        "episodes": episodes,
        "updates": config.num_total_batches,
        "episodes_per_s": episodes / train_s,
        "peak_rss_mb": probe["peak_after_train"],
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None,
        "peak_rss_mb_end": usage.ru_maxrss / 1024,
        "rss_after_imports_mb": probe["rss_mb"]["imported"],
        "peak_rss_mb_at": {**probe["rss_mb"], "end": usage.ru_maxrss / 1024},
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "split_s": {"generation": probe["generation"], "scoring": scoring,
                    "ppo_epochs": train_s - probe["rollouts"]},
        "logged": {
            "updates_logged": len(logged),
            "first_update_scores": logged[0]["objective/scores"] if logged else None,
            **({k: sum(h[k] for h in logged) / len(logged) for k in ("objective/scores", "objective/kl")}
               if logged else {}),
        },
        "lr_once_per_update": lr_once_per_update(trainer),
        "tokens": dict(trainer.token_counts),  # scoring passes and PPO epochs: computed and real
        "padding_free": trainer.layout,
        "prompts": len(trainer.train_dataset),
        "same_prompts_as_data_file": same_prompts,
        "policy": config.output_dir,
        "args": {k: v for k, v in config.to_dict().items() if isinstance(v, simple)},
        "attn_implementation": getattr(trainer.accelerator.unwrap_model(trainer.model).policy.config,
                                       "_attn_implementation", None),
        "torch_threads": torch.get_num_threads(),
        "hidden_packages": args.hide,
        "versions": versions(),
    }
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)


def lr_once_per_update(trainer) -> bool | None:
    """Whether the run's learning-rate multiplier stayed the same over every update's optimizer steps (TRL 1.12
    stepped its scheduler once per update); None for a scheduler that is not multiplier-based."""
    multipliers = getattr(trainer.lr_scheduler, "lr_lambdas", None)
    if not multipliers:
        return None
    per, steps = trainer.steps_per_update, trainer.args.max_steps
    rates = [multipliers[0](step) for step in range(steps)]
    return all(len(set(rates[i:i + per])) == 1 for i in range(0, steps, per))


if __name__ == "__main__":
    main()
