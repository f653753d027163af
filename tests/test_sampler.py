"""The rollouts' sampler (pipeline/sampler.py): what it draws is what the model's own forward pass gives, on GPT-2
(absolute positions), Llama (rotary) and Gemma 3 (sliding-window cache layers beside full ones), with left-padded
prompts, answers that stop at different steps (so the batch drops its finished rows) and several chunks; at a
temperature near 0 it answers what transformers' greedy `generate` does; its draws follow softmax(logits /
temperature)."""

import math

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)
from transformers.cache_utils import DynamicCache
from trl.trainer.utils import selective_log_softmax

from pipeline import rollout, sampler

PAD, STOPS = 1, [0, 7]
SAMPLE = sampler.sample


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def _gemma3():  # two sliding-window layers of 4 tokens and a full one: both kinds of cache layer
    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"])).eval()


def _gpt2():  # learned absolute positions: a row's must count from its first real token
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _queries():
    torch.manual_seed(1)
    queries = torch.randint(8, 50, (12, 9))
    queries[::3, :4], queries[1::3, :2] = PAD, PAD  # left padding of three widths
    return queries


@pytest.mark.parametrize("make", [_llama, _gemma3, _gpt2])
def test_draws_and_logprobs_are_the_models_own(make, monkeypatch):
    model, queries = make(), _queries()
    assert sampler.supported(model) is None
    selections, placed = [], []
    original, place = DynamicCache.batch_select_indices, sampler.GrowingLayer.place
    monkeypatch.setattr(DynamicCache, "batch_select_indices",
                        lambda cache, keep: (selections.append(len(keep)), original(cache, keep))[1])
    # prompts through the model 2 rows at a time, by length (the 5-row chunks' padding is not worth it otherwise)
    monkeypatch.setattr(sampler, "PREFILL_GROUP", 2)
    monkeypatch.setattr(sampler, "PREFILL_WORTH", 1.0)
    monkeypatch.setattr(sampler.GrowingLayer, "place", lambda layer, rows, *a: (placed.append(rows.tolist()),
                                                                                place(layer, rows, *a))[1])
    with torch.no_grad():  # stop tokens made likely enough for answers to end anywhere in 20 tokens
        model.lm_head.weight[STOPS] = model.lm_head.weight.mean(0) + 0.5 * model.lm_head.weight.std()
    config = rollout.sampling_config(20, 0.7, STOPS, PAD)
    torch.manual_seed(2)
    rows, logprobs = rollout.generate(model, queries, PAD, config, 5, return_logprobs=True)  # 3 chunks
    context = queries.shape[1]
    assert torch.equal(rows[:, :context], queries)
    mask = rollout.attention_mask(rows, context, PAD, STOPS)
    lengths = mask[:, context:].sum(1)
    assert lengths.min() < 10 and lengths.max() == 20 and rollout.ended(rows[:, context:], STOPS).any()
    assert selections  # finished rows left the batch
    # Gemma 3's sliding-window layers keep transformers' own cache: its prompts go through whole
    if make is _gemma3:
        assert not placed
    else:  # the first chunk's rows of 5, 7 and 9 prompt tokens, shortest first, into each layer
        layers = model.config.num_hidden_layers
        assert [sorted(rows) for rows in placed[:3 * layers:layers]] == [[0, 3], [1, 4], [2]]
    assert (rows[:, context:][~mask[:, context:]] == PAD).all()  # after the stop token: padding
    with torch.no_grad():
        logits = rollout.forward(model, rows, mask).logits[:, context - 1:-1]
    expected = selective_log_softmax(logits / config.temperature, rows[:, context:])
    torch.testing.assert_close(logprobs[mask[:, context:]], expected[mask[:, context:]], atol=2e-5, rtol=1e-4)
    # the same through transformers' generate (top_k 50 of a 50-token vocabulary is no filter, but not plain),
    # though the model's own generation config asks for penalties: sampling_config sets them off
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 1.5, 2
    model.generation_config.min_p = 0.2
    through_generate = GenerationConfig(**{**config.to_dict(), "top_k": 50})
    assert not rollout.plain_sampling(through_generate)
    generated, generated_logprobs = rollout.generate(model, queries, PAD, through_generate, 5, return_logprobs=True)
    generated_mask = rollout.attention_mask(generated, context, PAD, STOPS)[:, context:]
    with torch.no_grad():
        logits = rollout.forward(model, generated, rollout.attention_mask(generated, context, PAD, STOPS)).logits
    expected = selective_log_softmax(logits[:, context - 1:-1] / config.temperature, generated[:, context:])
    torch.testing.assert_close(generated_logprobs[generated_mask], expected[generated_mask], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [_llama, _gemma3, _gpt2])
def test_at_temperature_near_zero_it_answers_as_greedy_generate(make, monkeypatch):
    model, queries = make(), _queries()
    with torch.no_grad():  # a random model's logits lie within 0.1 of each other: spread them past any near-tie
        model.lm_head.weight *= 100
    config = rollout.sampling_config(12, 1e-4, [], PAD)
    calls = []
    monkeypatch.setattr(sampler, "sample", lambda *a, **k: (calls.append(1), SAMPLE(*a, **k))[1])
    rows = rollout.generate(model, queries, PAD, config, 5)
    assert calls  # through the sampler, not generate
    mask = rollout.query_mask(queries, PAD)
    greedy = model.generate(input_ids=queries.masked_fill(~mask, 0), attention_mask=mask, do_sample=False,
                            max_new_tokens=12, min_new_tokens=12, pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(rows[:, queries.shape[1]:], greedy[:, queries.shape[1]:])


def test_draws_follow_the_distribution_and_never_a_token_of_probability_zero():
    logits = torch.tensor([[2.0, 0.0, -float("inf"), 1.0, -1.0]]).repeat(40_000, 1)
    torch.manual_seed(0)
    tokens, logprobs = sampler.draw(logits, 0.7)
    expected = torch.softmax(logits[0] / 0.7, -1)
    frequencies = torch.bincount(tokens, minlength=5).float() / len(tokens)
    assert frequencies[2] == 0
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)
    torch.testing.assert_close(logprobs, expected.log()[tokens])


def test_a_cache_layer_grows_past_its_capacity_and_refuses_nan_logits():
    layer, keys = sampler.GrowingLayer(capacity=2), torch.randn(3, 2, 5, 4)
    for start, end in ((0, 1), (1, 3), (3, 5)):  # the buffer of 2 doubles to 4, then to 8
        returned, _ = layer.update(keys[..., start:end, :], -keys[..., start:end, :])
        assert torch.equal(returned, keys[..., :end, :]) and torch.equal(layer.values, -keys[..., :end, :])
    assert layer.buffers[0].shape[-2] == 8 and layer.get_seq_length() == 5
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, keys[[2, 0]])
    with pytest.raises(FloatingPointError, match="logits hold NaN or inf"):
        sampler.draw(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), 0.7)


def test_models_it_cannot_run_go_through_generate():
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2))
    assert sampler.supported(model) is None
    model.forward = lambda input_ids=None, attention_mask=None, **kwargs: None  # no `cache` parameter
    assert "takes no `cache`" in sampler.supported(model)
    # a hybrid of linear and full attention (Qwen3.5): its cache's linear-attention layers are not the sampler's
    torch.manual_seed(0)
    hybrid = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen3_5_text", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()
    assert sampler.supported(hybrid) == "its cache has LinearAttentionLayer layers"
    queries = _queries()
    rows, logprobs = rollout.generate(hybrid, queries, PAD, rollout.sampling_config(6, 0.7, STOPS, PAD), 5,
                                      return_logprobs=True)  # through transformers' generate
    assert torch.equal(rows[:, :queries.shape[1]], queries) and logprobs.shape == (12, rows.shape[1] - 9)
    assert not rollout.plain_sampling(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9))
    assert rollout.plain_sampling(rollout.sampling_config(8, 0.7, STOPS, PAD))


def test_a_policy_in_training_with_gradient_checkpointing_still_decodes_through_its_cache():
    """PPO samples from the policy in training mode; with gradient checkpointing (the gpt2-hh recipes) transformers
    drops the cache of a layer run with gradients, which would silently decode without the past."""
    model, queries = _llama(), _queries()
    model.gradient_checkpointing_enable()
    model.train()
    config = rollout.sampling_config(12, 0.7, [], PAD)
    assert sampler.supported(model) is None and rollout.plain_sampling(config)  # through the sampler
    torch.manual_seed(3)
    rows, logprobs = rollout.generate(model, queries, PAD, config, 12, return_logprobs=True)
    model.eval()
    context = queries.shape[1]
    with torch.no_grad():
        logits = rollout.forward(model, rows, rollout.attention_mask(rows, context, PAD, [])).logits
    expected = selective_log_softmax(logits[:, context - 1:-1] / config.temperature, rows[:, context:])
    torch.testing.assert_close(logprobs, expected, atol=2e-5, rtol=1e-4)


def test_grpo_and_rloo_generate_through_the_sampler_only_for_plain_sampling(monkeypatch):
    """The GRPO/RLOO stage (pipeline.stages.group) lets TRL's `_generate_single_turn` run, with its `generate` call
    on the policy drawn by the sampler: for TRL's default config (temperature, top_p 1, top_k 0); with top_p 0.9
    transformers' `generate` draws. The policy's own `generate` is back once the call returns."""
    import types

    from trl import GRPOTrainer, RLOOTrainer

    from pipeline.stages.group import monitored

    model, queries = _gpt2(), _queries()
    drawn = []
    monkeypatch.setattr(sampler, "sample", lambda *args, **kwargs: drawn.append(args[1].shape) or SAMPLE(*args,
                                                                                                           **kwargs))
    for trainer_class in (GRPOTrainer, RLOOTrainer):
        def trl_generate_single_turn(self, prompt_ids, images, multimodal_fields, *args):  # what TRL's does
            unwrapped = self.accelerator.unwrap_model(self.model_wrapped)
            return unwrapped.generate(input_ids=prompt_ids, attention_mask=rollout.query_mask(prompt_ids, PAD),
                                      generation_config=self.generation_config)

        monkeypatch.setattr(trainer_class, "_generate_single_turn", trl_generate_single_turn)
        trainer = monitored(trainer_class).__new__(monitored(trainer_class))
        trainer.accelerator = types.SimpleNamespace(unwrap_model=lambda wrapped: wrapped)
        trainer.model_wrapped, trainer.processing_class = model, types.SimpleNamespace(pad_token_id=PAD)
        for top_p, through_sampler in ((1.0, True), (0.9, False)):
            trainer.generation_config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7,
                                                         top_p=top_p, top_k=0, repetition_penalty=1.0,
                                                         pad_token_id=PAD, eos_token_id=STOPS)
            drawn.clear()
            torch.manual_seed(0)
            rows = trainer._generate_single_turn(queries, None, {})
            assert drawn == ([queries.shape] if through_sampler else [])
            assert torch.equal(rows[:, :queries.shape[1]], queries) and rows.shape[1] <= queries.shape[1] + 6
            assert "generate" not in model.__dict__


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<eos>", "<pad>", "<unk>", *(f"w{i}" for i in range(47))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def test_grpo_and_rloo_take_the_old_policys_log_probs_from_the_sampler(tmp_path, monkeypatch):
    """The pass TRL makes right after generation for the old policy's log-probabilities (GRPO when its policy moves
    on before its last pass over the answers, RLOO always) is read from the sampler's draws: no forward pass, the
    values of the pass within float rounding. It is made wherever the sampled values would not be those: answers
    other than the ones drawn, the reference of a LoRA policy (its adapters off), dropout."""
    import copy

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from pipeline import padding_free
    from pipeline.stages import group

    model = _gpt2()
    with torch.no_grad():  # EOS (0) about once in 5 tokens: answers that end anywhere in 8 (bench/ppo_long.py's way)
        direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
        model.transformer.ln_f.bias.copy_(10 * direction)
        model.lm_head.weight[0] = direction * 0.7 * math.log(50 / 4) / 10
    words = [f"w{i}" for i in range(47)]
    prompts = [" ".join(words[(3 * i + j) % 47] for j in range(2 + i % 5)) for i in range(8)]  # 2 to 6 tokens
    passes = []
    fused = padding_free.fused_log_probs
    monkeypatch.setattr(padding_free, "fused_log_probs", lambda *a, **k: passes.append(len(a[1])) or fused(*a, **k))
    for trainer_class, config_class, bf16 in ((GRPOTrainer, GRPOConfig, False), (RLOOTrainer, RLOOConfig, False),
                                              (GRPOTrainer, GRPOConfig, True)):
        args = config_class(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                            max_completion_length=8, gradient_accumulation_steps=2, num_iterations=2, beta=0.0,
                            disable_dropout=True, temperature=0.7, use_cpu=True, report_to="none", max_steps=1,
                            bf16=bf16)
        trainer = group.monitored(trainer_class)(
            model=copy.deepcopy(model), reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
            args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=_word_tokenizer())
        trainer.monitor = None
        torch.manual_seed(0)
        passes.clear()
        out = trainer._generate_and_score_completions([{"prompt": prompt} for prompt in prompts])
        if bf16:  # under autocast TRL's pass rounds otherwise than the draws: made, as TRL makes it
            assert passes == [8] and trainer.sampled is None
            continue
        assert passes == [] and trainer.sampled is None  # no pass made; the draws used once
        completion = out["completion_mask"].bool()
        assert completion.sum(1).min() < 8 and completion.sum(1).max() == 8  # answers of several lengths
        rows = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        with torch.no_grad():  # the pass, made
            expected = trainer._get_per_token_logps_and_entropies(trainer.model, rows, mask, completion.shape[1])[0]
        assert passes == [8]
        if trainer_class is GRPOTrainer:
            torch.testing.assert_close(out["old_per_token_logps"][completion], expected[completion], atol=2e-5,
                                       rtol=1e-4)
            assert (out["old_per_token_logps"][~completion] == 0).all()
        else:
            torch.testing.assert_close(out["old_logps"], (expected * completion).sum(1), atol=1e-4, rtol=1e-4)

    # where the draws' values are not the pass's: None, and TRL's pass runs
    answers, context = torch.randint(8, 50, (4, 6)), torch.randint(8, 50, (4, 3))
    rows, mask = torch.cat([context, answers], 1), torch.ones(4, 9, dtype=torch.long)
    drawn = group.Sampled(answers, -torch.rand(4, 6), ())
    policy = copy.deepcopy(model).eval()
    torch.testing.assert_close(group.sampled_log_probs(policy, drawn, rows, mask, 6), drawn.log_probs)
    changed = rows.clone()
    changed[2, -1] += 1  # an answer TRL changed after the draw (a tool's output)
    assert group.sampled_log_probs(policy, drawn, changed, mask, 6) is None
    assert group.sampled_log_probs(policy, drawn._replace(answers=answers[:, :5]), rows, mask, 6) is None  # longer
    assert group.sampled_log_probs(policy.double(), drawn, rows, mask, 6) is None  # not float32
    policy.float()
    lora = get_peft_model(copy.deepcopy(policy), LoraConfig(r=2, target_modules=["c_attn"]))
    lora.eval()
    drawn = drawn._replace(adapters=group.adapter_state(lora))
    assert group.sampled_log_probs(lora, drawn, rows, mask, 6) is not None
    with lora.disable_adapter():  # TRL's reference for a LoRA policy
        assert group.sampled_log_probs(lora, drawn, rows, mask, 6) is None
    dropping = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    assert group.drops_out(dropping.train()) and not group.drops_out(dropping.eval())
    assert group.sampled_log_probs(dropping.train(), drawn._replace(adapters=()), rows, mask, 6) is None
