"""Padding-free PPO (pipeline/padding_free.py): the rows and packed layouts compute only real tokens, and PPO's
rollout scores, advantages, losses and gradients equal TRL 1.12's padded computation's, on micro models of a
family other than GPT-2 (Llama), in process; on the same micro models, the learning rate moves once per update as
in TRL 1.12."""

import copy

import pytest
import torch
from datasets import Dataset
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, OPTConfig, OPTForCausalLM,
                          TrainerCallback)

from pipeline import padding_free
from pipeline.models import fit_to_tokenizer
from pipeline.trainers.ppo import PPOConfig, PPOTrainer

from test_any_model import CHATML, word_tokenizer


def blocks(laid, key="input_ids"):
    return [block[key].tolist() for block in laid.blocks()]


def test_layouts_hold_every_real_token_once_and_count_their_padding():
    pad = 0
    rows = torch.tensor([[0, 0, 5, 6, 7, 8, 0, 0],  # 2-token query left-padded, 2-token answer, right pads
                         [0, 0, 0, 9, 4, 0, 0, 0],
                         [3, 4, 5, 6, 7, 8, 9, 3],
                         [0, 0, 0, 0, 2, 3, 4, 0]])
    mask = rows != pad

    def tokens(laid, mask=mask):  # every real token, read back from the layout through its index
        return laid.read([block["input_ids"][..., None] for block in laid.blocks()], mask)[:, 0].tolist()

    padded, alone, packed, flat = (padding_free.layout(rows, mask, how) for how in ("padded", "rows", "packed",
                                                                                      "flat"))
    for laid in (padded, alone, packed, flat, padding_free.layout(rows, mask, "flat", capacity=9)):
        assert tokens(laid) == rows[mask].tolist()
        assert laid.real_tokens == 17
    assert padded.computed_tokens == 32 and padded.attention_mask is not None
    # each rollout row alone, fullest first; the three short ones in a block cut to the longest of them (4)
    assert blocks(alone) == [[[3, 4, 5, 6, 7, 8, 9, 3]], [[5, 6, 7, 8], [2, 3, 4, 0], [9, 4, 0, 0]]]
    assert blocks(alone, "position_ids") == [[list(range(8))], [list(range(4))] * 3]
    assert alone.computed_tokens == 20 and alone.attention_mask is None
    # first-fit decreasing into rows of the longest (8): the 8-token row alone, the 4- and 3-token rows together,
    # the 2-token one left over, cut to a block of its own width; positions restart at each rollout row
    assert blocks(packed) == [[[3, 4, 5, 6, 7, 8, 9, 3], [5, 6, 7, 8, 2, 3, 4, 0]], [[9, 4]]]
    assert blocks(packed, "position_ids") == [[list(range(8)), [0, 1, 2, 3, 0, 1, 2, 3]], [[0, 1]]]
    assert packed.computed_tokens == 18 and packed.attention_mask is None
    assert blocks(flat) == [[[3, 4, 5, 6, 7, 8, 9, 3, 5, 6, 7, 8, 2, 3, 4, 9, 4]]] and flat.computed_tokens == 17
    assert blocks(flat, "position_ids") == [[[*range(8), *range(4), *range(3), 0, 1]]]
    assert padding_free.layout(rows, mask, "flat", capacity=9).shapes == [(2, 9)]  # a token budget per row
    # cut into parts of one layout row (the scoring passes' chunks): each rollout row in one part, read alike
    parts = list(packed.parts(1))
    assert [members.tolist() for members, _ in parts] == [[2], [0, 3], [1]]
    for members, part in parts:
        assert tokens(part, mask[members]) == rows[members][mask[members]].tolist()
    assert [members.tolist() for members, _ in alone.parts(3)] == [[2], [0, 1, 3]]
    assert [members.tolist() for members, _ in padded.parts(3)] == [[0, 1, 2], [3]]
    # with the weights sharded over processes (`lockstep`), every process must make the same passes: one block,
    # and groups of a fixed number of rollout rows, whatever the lengths
    assert padding_free.layout(rows, mask, "packed", one_block=True).shapes == [(3, 8)]
    assert padding_free.layout(rows, mask, "rows", one_block=True).shapes == [(4, 8)]
    grouped = list(padding_free.groups(rows, mask, "packed", 3))
    assert [members.tolist() for members, _ in grouped] == [[0, 1, 2], [3]]
    assert [part.shapes for _, part in grouped] == [[(2, 8)], [(1, 3)]]
    for members, part in grouped:
        assert tokens(part, mask[members]) == rows[members][mask[members]].tolist()
    with pytest.raises(ValueError, match="padding_free must be one of flat, packed, rows, padded, got 'dense'"):
        padding_free.layout(rows, mask, "dense")


@pytest.fixture(scope="module")
def setting():
    """A micro Llama policy and value/reward model, a ChatML tokenizer, prompts of 1 to 9 words."""
    tokenizer = word_tokenizer(CHATML, "<|endoftext|>", "<|pad|>", ("<|im_start|>", "<|im_end|>"))
    tokenizer.padding_side = "left"
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    policy = fit_to_tokenizer(LlamaForCausalLM(LlamaConfig(**config)), tokenizer)
    scorer = fit_to_tokenizer(LlamaForSequenceClassification(LlamaConfig(**config, num_labels=1)), tokenizer)
    words = "hi a review of the film".split()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": " ".join(words[:n % 6 + 1] * (1 + n % 2))}],
                                             add_generation_prompt=True, tokenize=True) for n in range(8)]
    prompts = [p["input_ids"] if hasattr(p, "keys") else p for p in prompts]
    return tokenizer, policy, scorer, Dataset.from_dict({"input_ids": prompts})


def _trainer(setting, layout, tmp_path, **fields):
    tokenizer, policy, scorer, dataset = setting
    sizes = dict(gradient_accumulation_steps=2, num_mini_batches=1, num_ppo_epochs=1, total_episodes=8)
    args = PPOConfig(output_dir=str(tmp_path / layout), padding_free=layout, per_device_train_batch_size=4,
                     response_length=10, stop_token="eos", use_cpu=True, bf16=False, report_to=[],
                     gradient_checkpointing=False, local_rollout_forward_batch_size=8, seed=1, **{**sizes, **fields})
    return PPOTrainer(args=args, processing_class=tokenizer, model=copy.deepcopy(policy), ref_model=None,
                      reward_model=copy.deepcopy(scorer), value_model=copy.deepcopy(scorer), train_dataset=dataset)


def test_ppo_rollouts_losses_and_gradients_equal_the_padded_computation(setting, tmp_path):
    tokenizer, _, _, dataset = setting
    queries = tokenizer.pad({"input_ids": dataset["input_ids"]}, return_tensors="pt")["input_ids"]
    results = {}
    for layout in ("off", "rows", "packed", "flat", "packed lockstep", "flat lockstep"):
        trainer = _trainer(setting, layout.split()[0], tmp_path)
        trainer.lockstep = "lockstep" in layout  # as with weights sharded over processes: groups, one block each
        torch.manual_seed(1)  # the same samples from every trainer
        buffer = trainer._make_rollouts(queries)
        inputs = {key: value[buffer["schedule"][0]] for key, value in buffer.items()
                  if isinstance(value, torch.Tensor)}
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        results[layout] = buffer, loss, grads, trainer.token_counts
    padded, padded_loss, padded_grads, padded_counts = results["off"]
    mask = padded["attention_mask"]
    assert (~mask).any(dim=1).all()  # every row has padding: left (shorter prompts) or right (shorter answers)
    assert padded["padding"].any() and not padded["padding"].all()  # answers of several lengths
    micro_batch = padded["schedule"][0]
    assert len(padding_free.layout(padded["query_responses"][micro_batch], mask[micro_batch], "packed").shapes) == 2
    for layout in ("rows", "packed", "flat", "packed lockstep", "flat lockstep"):
        buffer, loss, grads, counts = results[layout]
        assert torch.equal(buffer["query_responses"], padded["query_responses"])  # the same samples
        for key in ("logprobs", "values", "returns", "advantages"):
            torch.testing.assert_close(buffer[key], padded[key], atol=1e-5, rtol=1e-4, msg=f"{layout}: {key}")
        torch.testing.assert_close(loss, padded_loss, atol=1e-6, rtol=1e-5)
        assert grads.keys() == padded_grads.keys() and len(grads) > 10  # policy and value model alike
        for name, grad in grads.items():
            torch.testing.assert_close(grad, padded_grads[name], atol=1e-6, rtol=1e-4, msg=f"{layout}: {name}")
        assert counts["real"] == padded_counts["real"] and counts["computed"] < padded_counts["computed"]
    assert results["packed"][3]["computed"] < results["rows"][3]["computed"]
    assert results["flat"][3]["computed"] == results["flat"][3]["real"]  # no padding at all


class _Rates(TrainerCallback):
    """The learning rate each optimizer step uses (read just before the step)."""

    def __init__(self):
        self.rates = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates.append(optimizer.param_groups[0]["lr"])


def test_the_learning_rate_moves_once_per_update_as_in_trl_1_12(setting, tmp_path):
    # 3 updates of 2 epochs x 2 mini-batches = 12 optimizer steps; TRL 1.12 stepped its scheduler once per update,
    # over num_total_batches (3), warmup counted in updates
    rates = _Rates()
    trainer = _trainer(setting, "packed", tmp_path, gradient_accumulation_steps=1, num_mini_batches=2,
                       num_ppo_epochs=2, total_episodes=24, learning_rate=1e-3, lr_scheduler_type="linear",
                       warmup_steps=1, save_strategy="no", logging_steps=100)
    trainer.add_callback(rates)
    trainer.train()
    assert trainer.args.num_total_batches == 3 and trainer.state.global_step == 12
    assert rates.rates == pytest.approx([0.0] * 4 + [1e-3] * 4 + [5e-4] * 4)  # warmup 1 update, then linear to 0
    # the scheduler's checkpoint state keeps no function (as transformers' own) and loads back
    state = trainer.lr_scheduler.state_dict()
    trainer.lr_scheduler.load_state_dict(state)
    assert state["last_epoch"] == 12 and set(trainer.lr_scheduler.get_last_lr()) == {0.0}
    from bench.ours_ppo import lr_once_per_update  # what the PPO benchmark reports of ours' runs

    assert lr_once_per_update(trainer) is True


def test_auto_packs_only_models_that_keep_packed_rows_apart(setting, tmp_path):
    tokenizer, _, _, dataset = setting
    assert _trainer(setting, "auto", tmp_path).layout == "packed"  # Llama: restarting position ids are honoured
    torch.manual_seed(0)
    opt = fit_to_tokenizer(OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=16, ffn_dim=32,
                                                    num_hidden_layers=1, num_attention_heads=2,
                                                    word_embed_proj_dim=16, max_position_embeddings=64)), tokenizer)
    assert not padding_free.keeps_packed_examples_apart(opt)  # learned positions from the mask, not position ids
    opt_setting = (tokenizer, opt, setting[2], dataset)
    assert _trainer(opt_setting, "auto", tmp_path).layout == "rows"
    for layout in ("packed", "flat"):
        with pytest.raises(ValueError, match=f"padding_free: {layout} needs models that keep rows packed together "
                                             "apart by their position ids; OPTForCausalLM does not"):
            _trainer(opt_setting, layout, tmp_path)


def test_logits_are_the_models_own_at_the_positions_read():
    """`logits_at` runs the body and then the LM head on the positions read; for a model that caps its logits after
    the head (Gemma 2's soft-cap) it runs the whole model, since the head alone would miss the cap."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    rows = torch.tensor([[0, 5, 6, 7, 8, 0], [3, 4, 5, 6, 7, 8]])
    mask = rows != 0
    where = mask.clone()
    where[:, :2] = False
    small = dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=16, head_dim=8)
    torch.manual_seed(0)
    for model in (LlamaForCausalLM(LlamaConfig(**small)),
                  Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=0.5))):
        laid = padding_free.layout(rows, mask, "rows")
        with torch.no_grad():
            expected = laid.read([model(**block).logits for block in laid.blocks()], where)
            got = padding_free.logits_at(model, laid, where)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert got.shape == (int(where.sum()), 16)
    assert expected.abs().max() <= 0.5  # the cap was applied


def _group_trainer(trainer_class, layout):
    """The stage's GRPO/RLOO trainer class (pipeline.stages.group) without its setup: the log-probability method
    reads only `layout` and the accelerator's autocast."""
    import types
    from contextlib import nullcontext

    from pipeline.stages.group import monitored

    trainer = monitored(trainer_class).__new__(monitored(trainer_class))
    trainer.layout, trainer.lockstep = layout.split()[0], "lockstep" in layout
    trainer.accelerator = types.SimpleNamespace(autocast=nullcontext, is_main_process=True)
    return trainer


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_grpo_and_rloo_log_probs_are_each_answers_own_on_every_layout(architecture):
    """TRL's GRPO/RLOO score prompt + answer rows (prompts left-padded) through the fused LM head. The stage's
    layouts give each answer token the log-probability (and entropy) the model gives it with the row alone, at
    temperature 0.7, the same gradients every way, whole logits (lm_head: auto) or TRL's tiles. TRL 1.16's own
    scoring shifts a left-padded row's positions: on GPT-2's learned positions that changes the numbers; on
    Llama's rotary positions it does not."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import GRPOTrainer, RLOOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from pipeline.lm_head import materialise_small_logits

    def micro(whole):
        torch.manual_seed(0)
        if architecture == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_layer=2, n_head=2, n_embd=16, n_positions=32,
                                               bos_token_id=1, eos_token_id=2))
        else:
            model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                 max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                                                 pad_token_id=0))
        model.eval()  # no dropout; gradients still flow
        add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
        assert not whole or materialise_small_logits(model, temperature=0.7, labelled_only=True)  # as the stage
        return model

    generator = torch.Generator().manual_seed(3)
    prompt, answer = 6, 5
    rows = torch.randint(3, 40, (4, prompt + answer), generator=generator)
    mask = torch.ones_like(rows, dtype=torch.bool)
    mask[0, :3] = mask[1, :1] = mask[3, :2] = False  # left-padded prompts
    mask[2, -2:] = mask[3, -4:] = False  # answers that stopped early
    rows = rows.masked_fill(~mask, 0)
    model = micro(whole=False)
    truth_logps, truth_entropy = torch.zeros(4, answer), torch.zeros(4, answer)
    with torch.no_grad():
        for b in range(4):
            alone = rows[b][mask[b]][None]
            log_softmax = (model(input_ids=alone).logits[0, :-1] / 0.7).log_softmax(-1)
            n = int(mask[b, prompt:].sum())
            truth_logps[b, :n] = log_softmax.gather(-1, alone[0, 1:, None])[-n:, 0]
            truth_entropy[b, :n] = -(log_softmax.exp() * log_softmax).sum(-1)[-n:]
    weights = torch.randn(4, answer, generator=generator)
    gradients = {}
    for trainer_class in (GRPOTrainer, RLOOTrainer):
        for layout in ("padded", "rows", "packed", "flat", "packed lockstep"):
            for whole in (False, True):
                model = micro(whole)
                logps, entropy, aux = _group_trainer(trainer_class, layout)._get_per_token_logps_and_entropies(
                    model, rows, mask.long(), answer, batch_size=3, compute_entropy=True)
                torch.testing.assert_close(logps, truth_logps, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(entropy, truth_entropy, atol=1e-5, rtol=1e-5)
                assert aux is None
                ((logps * weights).sum() + entropy.sum()).backward()
                gradients[trainer_class, layout, whole] = [p.grad for p in model.parameters()]
        trl_logps = trainer_class._get_per_token_logps_and_entropies(
            _group_trainer(trainer_class, "padded"), micro(False), rows, mask.long(), answer)[0].detach()
        shifted = (trl_logps - truth_logps).abs().max(1).values
        assert shifted[2] < 1e-5  # the one row without left padding
        if architecture == "gpt2":
            assert shifted[[0, 1, 3]].min() > 1e-2
        else:
            assert shifted.max() < 1e-5
    reference = gradients[GRPOTrainer, "padded", False]
    for key, grads in gradients.items():
        for got, expected in zip(grads, reference):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=str(key))


def test_grpo_hands_multimodal_rows_to_trl():
    """Images (or MoE's auxiliary loss) go to TRL's own scoring, unchanged."""
    from trl import GRPOTrainer

    seen = []
    original = GRPOTrainer._get_per_token_logps_and_entropies
    try:
        GRPOTrainer._get_per_token_logps_and_entropies = lambda self, *args, **kwargs: seen.append(kwargs) or "trl"
        trainer = _group_trainer(GRPOTrainer, "packed")
        assert trainer._get_per_token_logps_and_entropies(None, None, None, 3, pixel_values=torch.zeros(1)) == "trl"
        assert trainer._get_per_token_logps_and_entropies(None, None, None, 3, compute_aux_loss=True) == "trl"
    finally:
        GRPOTrainer._get_per_token_logps_and_entropies = original
    assert len(seen) == 2


def test_lockstep_only_where_the_weights_are_sharded_over_processes():
    """ZeRO-3 and FSDP gather a sharded layer's weights from every process at each pass: only then must every
    process make the same passes (pipeline.padding_free.lockstep)."""
    import types

    def trainer(processes, fsdp=False, deepspeed=False):
        return types.SimpleNamespace(accelerator=types.SimpleNamespace(num_processes=processes),
                                     is_fsdp_enabled=fsdp, is_deepspeed_enabled=deepspeed)

    assert padding_free.lockstep(trainer(2, fsdp=True))
    assert not padding_free.lockstep(trainer(1, fsdp=True))
    assert not padding_free.lockstep(trainer(2))  # DDP: every process holds all the weights
    assert not padding_free.lockstep(trainer(2, deepspeed=True))  # ZeRO-2 here (no ZeRO-3 config is active)


def test_with_several_processes_grpo_calls_the_policy_once_per_chunk_as_trl_does():
    """Under DDP each call of the wrapped policy prepares its gradient reduction (and sharded weights are gathered per
    call): with several processes (`lockstep`) each chunk of rows is laid out in one block, one call per chunk, as
    TRL makes them; alone, a chunk may take two blocks (its least filled rows cut narrower)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_layer=1, n_head=2, n_embd=16, n_positions=32)).eval()
    add_fused_lm_head(model)
    calls = []
    fused = model.forward
    model.forward = lambda *args, **kwargs: calls.append(kwargs["input_ids"].shape) or fused(*args, **kwargs)
    rows = torch.randint(3, 40, (6, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(rows, dtype=torch.bool)
    mask[[0, 1, 3, 4], :8] = False  # per chunk of 3, two short rows beside a long one: packed, a narrower block
    for layout, expected in (("packed", 4), ("packed lockstep", 2)):
        calls.clear()
        _group_trainer(GRPOTrainer, layout)._get_per_token_logps_and_entropies(model, rows, mask.long(), 4,
                                                                               batch_size=3)
        assert len(calls) == expected, (layout, calls)


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "gemma2"])
def test_reward_pairs_packed_give_the_padded_scores_loss_and_gradients(architecture):
    """The reward stage's padding-free pairs (padding_free.packed_classifier): TRL's preference collator pads chosen
    and rejected rows on the right; laid out packed or flat, the scores, TRL's loss and every gradient equal the
    padded forward's, and a call it cannot lay out (left padding) goes to the model's own forward. Gemma 2: local
    attention layers whose window (4 tokens) the rows outrun, and logit soft-capping."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    from trl.trainer.reward_trainer import DataCollatorForPreference

    torch.manual_seed(0)
    if architecture == "gpt2":
        config = GPT2Config(vocab_size=40, n_layer=2, n_head=2, n_embd=16, n_positions=32, num_labels=1,
                            pad_token_id=0)
        model_class = GPT2ForSequenceClassification
    elif architecture == "llama":
        config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
        model_class = LlamaForSequenceClassification
    else:
        from transformers import Gemma2Config, Gemma2ForSequenceClassification

        config = Gemma2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8,
                              sliding_window=4, num_labels=1, pad_token_id=0)
        model_class = Gemma2ForSequenceClassification
    plain = model_class(config).eval()  # no dropout: both ways must draw nothing at random
    lengths = [(5, 9), (12, 3), (7, 7), (2, 11)]
    pairs = [{"chosen_ids": torch.randint(1, 40, (c,)).tolist(), "rejected_ids": torch.randint(1, 40, (r,)).tolist()}
             for c, r in lengths]
    # the pad token inside rows, as GPT-2's EOS is when it pads too: at a row's end (transformers then scores the
    # token before it) and in the middle (a turn's end)
    pairs[0]["chosen_ids"][-1] = pairs[2]["rejected_ids"][-1] = pairs[3]["rejected_ids"][4] = 0
    batch = DataCollatorForPreference(pad_token_id=0)(pairs)

    def run(model):
        model.zero_grad()
        scores = model(**batch, use_cache=False).logits
        chosen, rejected = torch.chunk(scores.squeeze(-1), chunks=2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()  # TRL's RewardTrainer's
        loss.backward()
        return scores.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected = run(plain)
    for how in ("packed", "flat"):
        laid = copy.deepcopy(plain)
        padding_free.packed_classifier(laid, how)
        calls = []
        body = padding_free.body(laid)
        hook = body.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].numel()),
                                              with_kwargs=True)
        got = run(laid)
        hook.remove()
        real = sum(c + r for c, r in lengths)  # 56 of the 96 the padded rows compute
        assert real == sum(calls) if how == "flat" else real <= sum(calls) < batch["input_ids"].numel() * 2 // 3
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=1e-5)
        for name, gradient in expected[2].items():
            torch.testing.assert_close(got[2][name], gradient, atol=1e-5, rtol=1e-4, msg=name)

    laid = copy.deepcopy(plain)
    padding_free.packed_classifier(laid, "packed")
    left = {"input_ids": torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]),
            "attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])}
    with torch.no_grad():
        torch.testing.assert_close(laid(**left).logits, plain(**left).logits)


def test_flat_rows_of_a_token_budget_keep_their_unused_slots_within_the_positions():
    """`flat` with a token budget (PPO's scoring passes) fills rows with several sequences;
    a row left part empty must not count positions past the longest sequence in its unused slots: GPT-2's learned
    position table ends there (an IndexError on the CPU, a device-side assert on a GPU)."""
    from transformers import GPT2Config, GPT2Model

    lengths = [8, 8, 8, 2, 1]
    mask = torch.arange(8)[None] < torch.tensor(lengths)[:, None]
    rows = torch.randint(1, 30, (5, 8)).masked_fill(~mask, 0)
    laid = padding_free.layout(rows, mask, "flat", capacity=24)
    assert laid.shapes == [(2, 24)] and int(laid.position_ids.max()) == 7
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=30, n_layer=1, n_head=2, n_embd=8, n_positions=8)).eval()
    with torch.no_grad():
        hidden = torch.cat([model(**block).last_hidden_state.flatten(0, 1) for block in laid.blocks()])
        for row, length in enumerate(lengths):  # each sequence as it is alone
            alone = model(input_ids=rows[row:row + 1, :length]).last_hidden_state[0]
            torch.testing.assert_close(hidden[laid.index[row, :length]], alone, atol=1e-5, rtol=1e-5)
