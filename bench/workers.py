"""What runs inside the measured child processes.

Every measured run is a fresh child process forked from a server that has already imported torch,
transformers, trl, datasets and accelerate (multiprocessing's "forkserver"), so each run pays no shared import
cost but starts from the same clean state, and its RSS high-water mark (ru_maxrss) is that run's alone.

A child installs a `Probe` (a timer around `Trainer.train` and a counter in `Trainer.training_step`; TRL's and
transformers' files are not touched, the wrappers live only in the child) and then runs either the pipeline's
stage (`ours`: `pipeline.stages.run(stage, ["--config", recipe])`, exactly what `scripts/<stage>.py` does) or
the bare-TRL script in this folder (`bare`) with the same recipe's TRL config fields. PPO is not here: TRL 1.16
has no PPOTrainer (bench/ppo_vs_trl112.py compares ours with TRL 1.12's).

This module imports nothing heavy at import time: the parent process (bench/run.py) imports it too.
"""

import os
import resource
import shutil
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the shared third-party stack, imported once by the fork server (not the pipeline: its import is its own cost)
PRELOAD = ["torch", "transformers", "datasets", "accelerate", "trl"]

now = time.perf_counter


# --------------------------------------------------------------------------------------------------- the probe

class Probe:
    """Wall-clock timers of one child. Times only while a trainer's `train()` runs."""

    def __init__(self):
        self.depth = 0  # > 0 inside train()
        self.trainer = None
        self.train_output = None
        self.train_start = self.train_end = None
        self.input_tokens = 0  # SFT: non-pad tokens fed to the model
        self.loss_tokens = 0  # SFT: tokens with a label (completion tokens)
        self.pairs = 0  # reward: preference pairs

    def install(self):
        import transformers
        from trl import RewardTrainer

        probe = self

        def timed_train(original):
            def train(trainer, *args, **kwargs):
                if probe.depth:
                    return original(trainer, *args, **kwargs)
                probe.trainer = trainer
                probe.depth += 1
                probe.train_start = now()
                try:
                    probe.train_output = original(trainer, *args, **kwargs)
                    return probe.train_output
                finally:
                    probe.train_end = now()
                    probe.depth -= 1
            return train

        transformers.Trainer.train = timed_train(transformers.Trainer.train)

        original_step = transformers.Trainer.training_step

        def training_step(trainer, model, inputs, *args, **kwargs):
            if isinstance(trainer, RewardTrainer):
                probe.pairs += int(inputs["input_ids"].shape[0]) // 2  # chosen rows then rejected rows
            elif "labels" in inputs:
                if "pipeline_real_tokens" in inputs:  # the pipeline's packed rows (pipeline.stages.sft.REAL_TOKENS)
                    probe.input_tokens += int(inputs["pipeline_real_tokens"].sum())
                elif "attention_mask" in inputs:
                    probe.input_tokens += int(inputs["attention_mask"].sum())
                else:  # padding-free: one flattened row, no pad
                    probe.input_tokens += int(inputs["input_ids"].numel())
                probe.loss_tokens += int((inputs["labels"][:, 1:] != -100).sum())
            return original_step(trainer, model, inputs, *args, **kwargs)

        transformers.Trainer.training_step = training_step
        return self


PROBE = Probe()


# ------------------------------------------------------------------------------------------------ child entry

def child_main(job: dict, conn) -> None:
    """Run one job in this (fresh) child; send back a dict of results, or {"error": ...}."""
    with open(job["log"], "a") as log:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    import datasets

    # every run tokenizes its data itself: no run reads another's cached map/filter results (a bare script's
    # load_dataset -> SFTTrainer chain would, from the second repeat on; our in-memory datasets never do)
    datasets.disable_caching()
    start = now()
    try:
        result = JOBS[job["kind"]](job)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["run_s"] = now() - start - result.get("bench_own_s", 0.0)
        result["cpu_s"] = usage.ru_utime + usage.ru_stime
        result["peak_rss_mb"] = usage.ru_maxrss / 1024
    except BaseException as error:  # SystemExit from a stage's error exit too
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"}
    sys.stdout.flush(), sys.stderr.flush()
    conn.send(result)
    conn.close()


# ------------------------------------------------------------------------------------------------------ jobs

def trl_fields(config_class, recipe: dict) -> dict:
    """The recipe's keys that are fields of the TRL config class (what a bare TRL script can take)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    return {k: v for k, v in recipe.items() if k in names}


def _train_job(job: dict, stage: str) -> dict:
    import yaml

    PROBE.install()
    recipe = yaml.safe_load(open(job["recipe"]))
    start = now()
    if job["impl"] == "ours":
        from pipeline.stages import run
        run(stage, ["--config", job["recipe"]])
    elif stage == "sft":
        from trl import SFTConfig

        from bench import bare_sft
        bare_sft.main(recipe["model_name_or_path"], recipe["dataset_name"], trl_fields(SFTConfig, recipe))
    else:
        from trl import RewardConfig

        from bench import bare_reward
        bare_reward.main(recipe["model_name_or_path"], recipe["dataset_name"], trl_fields(RewardConfig, recipe))
    end = now()
    trainer = PROBE.trainer
    if trainer is None or PROBE.train_end is None:
        raise RuntimeError("no trainer.train() call was seen")
    train_s = PROBE.train_end - PROBE.train_start
    args = trainer.args.to_dict()
    result = {
        "train_s": train_s,
        "setup_s": PROBE.train_start - start,
        "after_s": end - PROBE.train_end,
        "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None)
        if hasattr(trainer.model, "config") else None,
        "args": {k: v for k, v in args.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    result.update(steps=int(trainer.state.global_step), train_loss=float(PROBE.train_output.training_loss))
    if stage == "sft":
        result.update(tokens=PROBE.input_tokens, loss_tokens=PROBE.loss_tokens,
                      tokens_per_s=PROBE.input_tokens / train_s, loss_tokens_per_s=PROBE.loss_tokens / train_s)
        if job.get("heldout"):
            result.update(heldout(trainer, job["heldout"]))
    else:
        result.update(pairs=PROBE.pairs, pairs_per_s=PROBE.pairs / train_s)
    return result


def heldout(trainer, data_file: str) -> dict:
    """The trained model's loss on held-out SFT rows (completion tokens), unpacked for every configuration so
    that the figures compare; its time is the benchmark's own and is taken out of the run's time."""
    from datasets import load_dataset

    start = now()
    trainer.args.eval_packing = False  # padding-free configurations still flatten: exact, as checked
    loss = trainer.evaluate(eval_dataset=load_dataset("json", data_files=data_file, split="train"))["eval_loss"]
    return {"heldout_loss": loss, "bench_own_s": now() - start}


def job_sft(job):
    return _train_job(job, "sft")


def job_sft_cache(job):
    """SFT with datasets' cache on, kept in job["cache_dir"]: a first run (an empty cache) or a rerun (the cache
    a first run left), to time the data preparation a rerun or a resumed run does again or loads."""
    import datasets

    datasets.enable_caching()
    datasets.config.HF_DATASETS_CACHE = job["cache_dir"]
    return _train_job(job, "sft")


def job_reward(job):
    return _train_job(job, "reward")


MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def _snapshot(source: str, dest: str) -> None:
    """Copy a stage output's model and tokenizer files (not its checkpoints, logs or card)."""
    os.makedirs(dest, exist_ok=True)
    for name in MODEL_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(dest, name))


def _fresh_models(work: str, recipe_dir: str) -> str:
    """A tiny GPT-2 (untrained) with a BPE tokenizer trained on the embedded corpus, as in the pretrain recipe.
    For a machine without a prior `make demo`."""
    import torch
    import yaml
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline import embedded
    from pipeline.models import fit_to_tokenizer, train_tokenizer
    from pipeline.stages.pretrain import ACTIVATION

    recipe = yaml.safe_load(open(os.path.join(recipe_dir, "pretrain.yaml")))
    tokenizer = train_tokenizer(embedded.build("corpus", seed=0)["train"]["text"], recipe["vocab_size"])
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=recipe["n_positions"], n_embd=recipe["n_embd"],
                        n_layer=recipe["n_layer"], n_head=recipe["n_head"], resid_pdrop=recipe["dropout"],
                        embd_pdrop=recipe["dropout"], attn_pdrop=recipe["dropout"], activation_function=ACTIVATION,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    lm = os.path.join(work, "models", "lm")
    fit_to_tokenizer(GPT2LMHeadModel(config), tokenizer).save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    return lm


def job_prepare(job):
    """Data files (the same rows for ours and bare) and models; statistics of the SFT lengths."""
    import random

    import datasets
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from pipeline import embedded

    work, recipe_dir = job["work"], job["recipe_dir"]
    data = {}
    for kind, rows in (("sft", job["sft_rows"]), ("preference", job["preference_rows"])):
        train = embedded.build(kind, seed=0)["train"]
        if rows is not None:
            train = train.select(range(min(rows, len(train))))
        data[kind] = os.path.join(work, "data", f"{kind}.jsonl")
        train.to_json(data[kind], lines=True)
    # a larger SFT file for timing data preparation (the train rows, repeated): first run vs rerun
    repeated = embedded.build("sft", seed=0)["train"]
    repeated = datasets.concatenate_datasets([repeated] * -(-job["rerun_rows"] // len(repeated)))
    data["sft_rerun"] = os.path.join(work, "data", "sft-rerun.jsonl")
    repeated.select(range(job["rerun_rows"])).to_json(data["sft_rerun"], lines=True)
    data["sft_heldout"] = os.path.join(work, "data", "sft-heldout.jsonl")
    embedded.build("sft", seed=0)["test"].to_json(data["sft_heldout"], lines=True)

    demo = os.path.join(ROOT, "outputs", "tiny")
    stages = ("pretrain", "sft")
    models, source = {}, "fresh"
    if not job["fresh_models"] and all(os.path.isfile(os.path.join(demo, s, "model.safetensors")) for s in stages):
        try:
            for stage in stages:
                _snapshot(os.path.join(demo, stage), os.path.join(work, "models", stage))
            models = {"lm": os.path.join(work, "models", "pretrain"), "policy": os.path.join(work, "models", "sft")}
            AutoModelForCausalLM.from_pretrained(models["lm"]), AutoModelForCausalLM.from_pretrained(models["policy"])
            source = "outputs/tiny (pretrain, sft), copied"
        except Exception as error:  # a half-written demo output: fall back to fresh models
            print(f"outputs/tiny unusable ({error}); creating fresh models")
            models = {}
    if not models:
        lm = _fresh_models(work, recipe_dir)
        models = {"lm": lm, "policy": lm}
        source = "fresh: untrained tiny GPT-2 + BPE tokenizer from recipes/tiny/pretrain.yaml (no outputs/tiny)"
    # the reward stage starts from the SFT policy with a new score head: made once here, so that ours and bare
    # start from the same weights (a head initialised at load time depends on the RNG state of the process)
    models["reward_init"] = os.path.join(work, "models", "reward_init")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(models["policy"], num_labels=1).save_pretrained(
        models["reward_init"])
    AutoTokenizer.from_pretrained(models["policy"]).save_pretrained(models["reward_init"])

    # token lengths of the SFT rows, as the chat template renders them, truncated at the recipe's max_length
    tokenizer = AutoTokenizer.from_pretrained(models["lm"])
    sft_recipe = yaml.safe_load(open(os.path.join(recipe_dir, "sft.yaml")))
    max_length, batch = sft_recipe["max_length"], sft_recipe["per_device_train_batch_size"]

    def length_of(row):
        return len(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                                 return_dict=False))

    def stats(lengths):
        shuffled = lengths[:]
        random.Random(0).shuffle(shuffled)
        batches = [shuffled[i:i + batch] for i in range(0, len(shuffled), batch)]
        padded = sum(max(b) * len(b) for b in batches)
        ordered = sorted(lengths)
        return {"rows": len(lengths), "mean": sum(lengths) / len(lengths), "min": ordered[0],
                "median": ordered[len(ordered) // 2], "p90": ordered[int(0.9 * (len(ordered) - 1))],
                "max": ordered[-1], "max_length": max_length, "padding_share_at_batch": batch,
                "padding_share": 1 - sum(lengths) / padded}

    rows = embedded.build("sft", seed=0)["train"].select(range(min(job["sft_rows"], 6000)))
    lengths = [min(max_length, length_of(r)) for r in rows]

    # variable-length SFT data, as chat data is: the embedded rows as the last turn of conversations of 1 to 4
    # turns (earlier turns drawn from other rows; half the conversations have one turn, a tenth have four),
    # kept when they fit in max_length. The loss is on the last assistant turn, as in the recipe.
    def conversations(split, n):
        source = embedded.build("sft", seed=0)[split]
        rng, out = random.Random(1), []
        for i in range(len(source)):
            if len(out) == n:
                break
            turns = rng.choices([1, 2, 3, 4], weights=[50, 25, 15, 10])[0]
            earlier = [source[rng.randrange(len(source))] for _ in range(turns - 1)]
            row = {"prompt": [m for e in earlier for m in e["prompt"] + e["completion"]] + source[i]["prompt"],
                   "completion": source[i]["completion"]}
            if length_of(row) <= max_length:
                out.append(row)
        return datasets.Dataset.from_list(out)

    varlen = conversations("train", job["sft_rows"])
    data["sft_varlen"] = os.path.join(work, "data", "sft-varlen.jsonl")
    varlen.to_json(data["sft_varlen"], lines=True)
    data["sft_varlen_heldout"] = os.path.join(work, "data", "sft-varlen-heldout.jsonl")
    conversations("test", 300).to_json(data["sft_varlen_heldout"], lines=True)
    model = AutoModelForCausalLM.from_pretrained(models["lm"])
    return {
        "data": data, "models": models, "model_source": source, "parameters": model.num_parameters(),
        "train_rows": {kind: len(embedded.build(kind, seed=0)["train"]) for kind in ("sft", "preference")},
        "model_config": {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "n_positions",
                                                               "vocab_size")},
        "sft_lengths": stats(lengths),
        "sft_varlen_lengths": stats([length_of(r) for r in varlen]),
    }


def job_check_padding_free(job):
    """Is padding-free (one flattened row + position_ids, what packing "bfd" feeds the model) correct with this
    machine's attention (sdpa, eager: no varlen kernel)? The same examples, padded vs flattened, per-token loss
    compared, with use_cache=False as SFTTrainer trains; and flattened with an all-ones attention mask (no
    block-diagonal mask: examples see each other) to show that the comparison can fail, and with use_cache=True
    (transformers does not look for packed sequences when a cache is in use)."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    rows = load_dataset("json", data_files=job["data"], split="train").select(range(16))
    prepared = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(job["model"]), processing_class=tokenizer, train_dataset=rows,
        args=SFTConfig(output_dir=os.path.join(job["work"], "check"), max_length=128, completion_only_loss=True,
                       report_to="none", use_cpu=True),
    ).train_dataset
    examples = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in prepared]

    def token_nll(model, batch, use_cache=False):  # SFTTrainer.compute_loss passes use_cache=False
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch, use_cache=use_cache).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        return nll[targets != -100]  # row-major: example by example in both layouts

    # the pipeline's rows layout: the examples packed in order into rows of at most 128 tokens (so that the
    # row-major token order is still the examples' order), batched by its PackedRowsCollator
    from pipeline.stages.sft import REAL_TOKENS, PackedRowsCollator

    packed = []
    for e in examples:
        if packed and sum(packed[-1]["seq_lengths"]) + len(e["input_ids"]) <= 128:
            row = packed[-1]
            row["input_ids"] += e["input_ids"]
            row["labels"] += e["labels"]
            row["seq_lengths"].append(len(e["input_ids"]))
        else:
            packed.append({"input_ids": list(e["input_ids"]), "labels": list(e["labels"]),
                           "seq_lengths": [len(e["input_ids"])]})

    out = {"examples": len(examples), "packed_rows": len(packed)}
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(job["model"], attn_implementation=attn).eval()
        padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
        flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
        rows = PackedRowsCollator(tokenizer.pad_token_id)(packed)
        rows.pop(REAL_TOKENS)
        leaky = dict(flat, attention_mask=torch.ones_like(flat["input_ids"]))
        reference = token_nll(model, padded)
        free, leak = token_nll(model, dict(flat)), token_nll(model, leaky)
        in_rows = token_nll(model, rows)
        # with a KV cache in play, transformers skips the packed-sequence detection: no block mask either
        cached = token_nll(model, dict(flat), use_cache=True)
        out[attn] = {
            "tokens": int(reference.numel()),
            "loss_padded": reference.mean().item(),
            "loss_padding_free": free.mean().item(),
            "max_abs_diff_padding_free": (free - reference).abs().max().item(),
            "loss_rows": in_rows.mean().item(),
            "max_abs_diff_rows": (in_rows - reference).abs().max().item(),
            "loss_flattened_without_block_mask": leak.mean().item(),
            "max_abs_diff_without_block_mask": (leak - reference).abs().max().item(),
            "max_abs_diff_padding_free_use_cache": (cached - reference).abs().max().item(),
        }
    return out


def job_noop(job):
    return {}


JOBS = {"noop": job_noop, "prepare": job_prepare, "check_padding_free": job_check_padding_free, "sft": job_sft,
        "sft-varlen": job_sft, "sft-cache": job_sft_cache, "reward": job_reward}
