"""One PPO run with TRL 1.12's `trl.experimental.ppo.PPOTrainer`, for bench/ppo_vs_trl112.py.

    <TRL 1.12 venv>/bin/python bench/trl112_ppo.py --config run.json --data train/ --eval-data eval/ --result out.json

Runs in the benchmark's TRL 1.12 virtual environment, so it imports nothing from `pipeline` (whose trainer needs
TRL >= 1.16): the prompts come tokenized from disk (`datasets.save_to_disk`, written by the main environment
exactly as `pipeline/stages/ppo.py: tokenize_prompts` tokenizes them). As TRL's own PPO example: the tokenizer
(left padding), the policy and the reference (AutoModelForCausalLM), the reward and the value model
(AutoModelForSequenceClassification, 1 label) from the recipe's `sft_model_path` / `reward_model_path`;
`PPOTrainer(...)`, `train()`, `save_model()`. `transformers.set_seed(seed)` first, as the pipeline's stage does
(TRL 1.12's PPOTrainer never seeds numpy, which orders its mini-batches).

Timers, installed in this process only (TRL's files are not touched): the `train()` call; inside it the
module-level functions of `trl.experimental.ppo.ppo_trainer` that the rollout calls: `batch_generation`
(generation), `forward` without gradients (the reference policy's log-probs), `get_reward` on the value model
and on the reward model (scoring). What is left of `train()` is the PPO epochs (with the advantages, logging).
The peak RSS (ru_maxrss) is read right after `train()` returns (models, data and training; not the save).
"""

import argparse
import dataclasses
import importlib.metadata
import json
import os
import resource
import time

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
    parser.add_argument("--config", required=True, help="JSON: the run's recipe (PPOConfig fields and others)")
    parser.add_argument("--data", required=True, help="tokenized training prompts (datasets.save_to_disk)")
    parser.add_argument("--eval-data", required=True, help="tokenized held-out prompts (datasets.save_to_disk)")
    parser.add_argument("--result", required=True, help="write the measurements here (JSON)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = now()

    import torch
    import transformers
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as module

    peaks = {}

    def rss(point: str) -> None:  # the high-water mark so far, at a point of the run
        peaks[point] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rss("imported")

    probe = {"inside": False, "trainer": None,
             "generation": 0.0, "reference": 0.0, "value": 0.0, "reward": 0.0}

    def timed(function, bucket):
        def wrapper(*a, **k):
            name = bucket(a) if probe["inside"] else None
            if name is None:
                return function(*a, **k)
            start = now()
            try:
                return function(*a, **k)
            finally:
                probe[name] += now() - start
        return wrapper

    # the rollout's calls; the PPO epochs call `forward` too, with gradients: that is optimisation, not scoring
    module.batch_generation = timed(module.batch_generation, lambda a: "generation")
    module.forward = timed(module.forward, lambda a: None if torch.is_grad_enabled() else "reference")
    module.get_reward = timed(module.get_reward,
                              lambda a: "reward" if a[0] is probe["trainer"].reward_model else "value")

    # tokens through the models in the rollout's scoring and the PPO epochs: every position of the padded rows, and
    # the real ones (TRL 1.12's own mask: not the pad id)
    tokens = {"computed": 0, "real": 0}

    def counted(function):
        def wrapper(model, query_responses, pad_token_id, *a, **k):
            if probe["inside"]:
                tokens["computed"] += query_responses.numel()
                tokens["real"] += int((query_responses != pad_token_id).sum())
            return function(model, query_responses, pad_token_id, *a, **k)
        return wrapper

    module.forward, module.get_reward = counted(module.forward), counted(module.get_reward)

    with open(args.config) as f:
        recipe = json.load(f)
    fields = {f.name for f in dataclasses.fields(PPOConfig)}
    config = PPOConfig(**{k: v for k, v in recipe.items() if k in fields})
    transformers.set_seed(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(config.sft_model_path, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(config.sft_model_path)
    ref_policy = AutoModelForCausalLM.from_pretrained(config.sft_model_path)
    reward_model = AutoModelForSequenceClassification.from_pretrained(config.reward_model_path, num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(config.reward_model_path, num_labels=1)
    train_dataset, eval_dataset = load_from_disk(args.data), load_from_disk(args.eval_data)
    rss("data and models loaded")

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, train_dataset=train_dataset, value_model=value_model,
                         eval_dataset=eval_dataset)
    rss("trainer built")
    probe["trainer"] = trainer
    probe["inside"] = True
    train_start = now()
    trainer.train()
    train_end = now()
    probe["inside"] = False
    rss("train() returned")
    trainer.save_model(config.output_dir)
    finished = now()

    train_s = train_end - train_start
    scoring = probe["reference"] + probe["value"] + probe["reward"]
    episodes = config.num_total_batches * config.batch_size
    logged = [h for h in trainer.state.log_history if "objective/scores" in h]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    simple = (int, float, str, bool, type(None))
    result = {
        "impl": "trl112",
        "seed": config.seed,
        "train_s": train_s,
        "setup_s": train_start - started,
        "after_s": finished - train_end,
        "episodes": episodes,
        "updates": config.num_total_batches,
        "episodes_per_s": episodes / train_s,
        "peak_rss_mb": peaks["train() returned"],
        "peak_rss_mb_end": usage.ru_maxrss / 1024,
        "rss_after_imports_mb": peaks["imported"],
        "peak_rss_mb_at": {**peaks, "end": usage.ru_maxrss / 1024},
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "split_s": {"generation": probe["generation"], "scoring": scoring,
                    "ppo_epochs": train_s - probe["generation"] - scoring,
                    "reference": probe["reference"], "value": probe["value"], "reward": probe["reward"]},
        "logged": {
            "updates_logged": len(logged),
            "first_update_scores": logged[0]["objective/scores"] if logged else None,
            **({k: sum(h[k] for h in logged) / len(logged) for k in ("objective/scores", "objective/kl")}
               if logged else {}),
        },
        "tokens": tokens,
        "prompts": len(train_dataset),
        "policy": config.output_dir,
        "ignored_recipe_keys": sorted(set(recipe) - fields),
        "args": {k: v for k, v in config.to_dict().items() if isinstance(v, simple)},
        "attn_implementation": getattr(policy.config, "_attn_implementation", None),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
    }
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
