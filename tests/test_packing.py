"""SFT packing in the pipeline's rows layout (pipeline/stages/sft.py: PackedRowsCollator): each bfd-packed row a
row of the batch, its examples kept apart by position_ids. It must compute what the examples compute alone, count
the real tokens, and be what `packed_batch_layout: auto` picks without flash attention."""

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel
from trl import SFTConfig
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from pipeline import embedded
from pipeline.lm_head import is_materialised
from pipeline.models import train_tokenizer
from pipeline.stages.sft import REAL_TOKENS, PackedRowsCollator, SFTStageTrainer

PAD = 0


def packed_row(*lengths, start=1):
    """One bfd-style packed row: consecutive token ids, every token a label."""
    ids = list(range(start, start + sum(lengths)))
    return {"input_ids": ids, "labels": list(ids), "seq_lengths": list(lengths)}


def test_collator_positions_labels_pads_and_token_count():
    batch = PackedRowsCollator(pad_token_id=PAD)([packed_row(3, 2), packed_row(4, start=10)])
    assert "attention_mask" not in batch  # the position_ids carry the boundaries; a mask would hide them
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [10, 11, 12, 13, PAD]]
    # an example's first token is not predicted from the example before it; pads are never targets
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 11, 12, 13, -100]]
    assert batch[REAL_TOKENS].tolist() == [5, 4]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_compute_what_each_example_computes_alone(attn):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_positions=32,
                                       attn_implementation=attn)).eval()
    lengths = [[5, 7, 3], [9, 6], [4]]  # the third row is padded to 15 tokens
    rows = [packed_row(*ls, start=1 + 3 * i) for i, ls in enumerate(lengths)]
    batch = PackedRowsCollator(pad_token_id=PAD)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        leaky = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]),
                      use_cache=False).logits
        worst = worst_leaky = 0.0
        for r, row in enumerate(rows):
            offset = 0
            for n in row["seq_lengths"]:
                ids = torch.tensor(row["input_ids"][offset:offset + n])[None]
                alone = model(input_ids=ids, use_cache=False).logits[0]
                worst = max(worst, (alone - logits[r, offset:offset + n]).abs().max().item())
                worst_leaky = max(worst_leaky, (alone - leaky[r, offset:offset + n]).abs().max().item())
                offset += n
    assert worst < 1e-5
    assert worst_leaky > 1e-2  # without the per-example mask the examples see each other: the check can fail


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    rows = embedded.build("sft", seed=0)["train"].select(range(40))
    texts = [m["content"] for r in rows for m in r["prompt"] + r["completion"]]
    tokenizer = train_tokenizer(texts * 3, vocab_size=300)
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=128,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.eos_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"path": path, "tokenizer": tokenizer, "rows": Dataset.from_list(list(rows))}


def sft_trainer(tiny, tmp_path, layout="auto", lm_head="auto", **config):
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=128, report_to="none", use_cpu=True,
                     num_train_epochs=1, per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                     disable_tqdm=True, seed=0, **config)
    model = GPT2LMHeadModel.from_pretrained(tiny["path"])
    return SFTStageTrainer(model=model, args=args, train_dataset=tiny["rows"], processing_class=tiny["tokenizer"],
                           packed_batch_layout=layout, lm_head=lm_head)


def test_lm_head_auto_trains_on_whole_logits_with_trls_loss_and_metrics(tiny, tmp_path, monkeypatch):
    """`lm_head: auto` (the default) on the CPU: the model's forward is the pipeline's whole-logits head, and an
    epoch logs what TRL's tiled head logs (loss, entropy, token accuracy) to rounding."""
    from trl.trainer import utils as trl_utils

    logged, tiles = {}, []
    tiled_apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda *args: tiles.append(1) or tiled_apply(*args))
    for lm_head in ("tiled", "auto"):
        trainer = sft_trainer(tiny, tmp_path / lm_head, lm_head=lm_head)
        assert is_materialised(trainer.model) == (lm_head == "auto")
        tiles.clear()
        trainer.train()
        assert bool(tiles) == (lm_head == "tiled")  # auto: no training step went through TRL's tiles
        logged[lm_head] = [entry for entry in trainer.state.log_history if "loss" in entry]
    with pytest.raises(ValueError, match="lm_head must be 'auto' or 'tiled', got 'whole'"):
        sft_trainer(tiny, tmp_path / "typo", lm_head="whole")
    assert len(logged["auto"]) == len(logged["tiled"]) == 10
    for tiled, whole in zip(logged["tiled"], logged["auto"]):
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert whole[key] == pytest.approx(tiled[key], rel=1e-3), key


def test_auto_layout_is_rows_without_flash_attention_and_flat_is_trls(tiny, tmp_path):
    rows = sft_trainer(tiny, tmp_path, packing=True, packing_strategy="bfd")
    assert isinstance(rows.data_collator, PackedRowsCollator)
    flat = sft_trainer(tiny, tmp_path, "flat", packing=True, packing_strategy="bfd")
    assert isinstance(flat.data_collator, DataCollatorForLanguageModeling) and flat.data_collator.padding_free
    unpacked = sft_trainer(tiny, tmp_path, "rows")  # no packing: the layout does not apply
    assert not isinstance(unpacked.data_collator, PackedRowsCollator)


def test_tokenizing_in_two_processes_gives_the_same_rows(tiny, tmp_path):
    # dataset_num_proc: 2 in the tiny recipes. Packing is another matter: TRL packs each map batch (1000 rows) on
    # its own, so 2 processes pack the same rows only when each half of the data is a whole number of batches
    prepared = {procs: sft_trainer(tiny, tmp_path / str(procs), dataset_num_proc=procs).train_dataset
                for procs in (1, 2)}
    assert len(prepared[1]) == len(tiny["rows"])
    assert prepared[1][:] == prepared[2][:]


def test_packed_rows_train_on_every_real_token_once(tiny, tmp_path):
    """One epoch, packed in rows vs padded: the same real tokens counted (TRL's own count, with no attention
    mask, would take one row's length per batch), and a finite loss."""
    counted = {}
    for name, config in (("padded", {}), ("rows", {"packing": True, "packing_strategy": "bfd"})):
        trainer = sft_trainer(tiny, tmp_path / name, **config)
        trainer.train()
        counted[name] = trainer._total_train_tokens
        assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
    assert counted["rows"] == counted["padded"] > 0


def test_packed_evaluation_gives_the_padded_loss(tiny, tmp_path):
    """Evaluation (eval_packing follows packing) goes through the same collator: the same untrained model
    scores the same held-out loss packed in rows as padded (one evaluation batch each: the Trainer averages
    per-batch means, which differ with the batch layout)."""
    losses = {}
    for name, config in (("padded", {}), ("rows", {"packing": True, "packing_strategy": "bfd"})):
        trainer = sft_trainer(tiny, tmp_path / name, per_device_eval_batch_size=64, **config)
        trainer.eval_dataset = trainer.train_dataset
        losses[name] = trainer.evaluate()["eval_loss"]
    assert abs(losses["rows"] - losses["padded"]) < 1e-5


def test_rows_layout_is_refused_with_flash_attention(tiny, tmp_path):
    """Flash attention keeps packed examples apart only in one flattened row: rows would let them mix."""
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=128, report_to="none", use_cpu=True,
                     packing=True, packing_strategy="bfd")
    model = GPT2LMHeadModel.from_pretrained(tiny["path"])
    model.config._attn_implementation = "flash_attention_2"  # only read, never run
    with pytest.raises(ValueError, match="packed_batch_layout: rows needs sdpa or eager attention"):
        SFTStageTrainer(model=model, args=args, train_dataset=tiny["rows"], processing_class=tiny["tokenizer"],
                        packed_batch_layout="rows")


def _micro(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2))
    return OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    ffn_dim=64, word_embed_proj_dim=32))


@pytest.mark.parametrize("kind, apart", [("llama", True), ("opt", False)])
def test_packing_is_switched_off_where_the_architecture_lets_packed_examples_see_each_other(kind, apart, caplog):
    """OPT ignores the position_ids that keep packed examples apart: each example would attend to the ones before
    it in its row. The SFT stage checks the model once and trains on padded rows there, saying so; Llama (and
    GPT-2) keep them apart and stay packed."""
    from pipeline.stages.sft import keeps_packed_examples_apart, unpack_if_leaking

    model = _micro(kind)
    assert keeps_packed_examples_apart(model) is apart
    assert model.training  # the probe leaves the model's mode as it found it
    args = SFTConfig(output_dir="unused", packing=True, packing_strategy="bfd", use_cpu=True, bf16=False)
    with caplog.at_level("WARNING", logger="pipeline"):
        unpack_if_leaking(model, args)
    assert args.packing is apart
    assert ("does not keep examples packed in one row apart" in caplog.text) is not apart
