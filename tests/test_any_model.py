"""What differs between causal-LM families, checked in process on micro models (no downloads): the stop token is
the end of an assistant turn as the chat template writes it, attention masks come from the rollout's layout
(not from the pad id), LoRA targets are checked against the model, the kind check accepts what
AutoModelForCausalLM maps a model type to, and PPO's wrapper takes transformers' activation-checkpointing call."""

import pytest
import torch
from transformers import Gemma3Config, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import ModelConfig

from pipeline import rollout
from pipeline.evaluate import response_lengths, sample
from pipeline.models import (CAUSAL_LM, CHAT_TEMPLATE, check_lora_targets, check_model_kind, fit_to_tokenizer,
                             stop_token_ids, turn_end_token_id)
from pipeline.trainers.ppo import PolicyAndValue

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
          "+ m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
PLAIN = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"


def word_tokenizer(template: str, eos: str, pad: str, specials=()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with the given special tokens and chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["hi", "a", "review", "of", "the", "film", "user", "assistant", "system", "\n", ":"]
    vocab = {token: i for i, token in enumerate([eos, pad, "<unk>", *specials, *words]) if token}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=pad, unk_token="<unk>",
                                        additional_special_tokens=list(specials))
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def chatml():
    """Qwen's layout: turns end with <|im_end|>, EOS is <|endoftext|>, and the pad is a token of its own."""
    return word_tokenizer(CHATML, "<|endoftext|>", "<|pad|>", ("<|im_start|>", "<|im_end|>"))


def micro_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return fit_to_tokenizer(LlamaForCausalLM(config).eval(), tokenizer)


def test_the_turn_end_is_read_from_the_chat_template(chatml):
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert turn_end_token_id(chatml) == im_end
    assert stop_token_ids(chatml) == [im_end, chatml.eos_token_id]  # the turn end first, EOS too, never the pad
    llama3 = word_tokenizer(LLAMA3, "<|end_of_text|>", "<|pad|>", ("<|start_header_id|>", "<|end_header_id|>",
                                                                  "<|eot_id|>"))
    assert turn_end_token_id(llama3) == llama3.convert_tokens_to_ids("<|eot_id|>")
    ours = word_tokenizer(CHAT_TEMPLATE, "<|endoftext|>", "<|pad|>")  # the pipeline's template ends turns with EOS
    assert turn_end_token_id(ours) == ours.eos_token_id and stop_token_ids(ours) == [ours.eos_token_id]
    plain = word_tokenizer(PLAIN, "<|endoftext|>", "<|pad|>")  # a template that writes no special token: EOS alone
    assert turn_end_token_id(plain) is None and stop_token_ids(plain) == [plain.eos_token_id]


def test_saved_generation_config_stops_at_the_turn_end(chatml, tmp_path):
    """fit_to_tokenizer writes the stop tokens into the generation config, so plain transformers' generate, TRL's
    GRPO/RLOO (which read it) and every later stage stop at <|im_end|>."""
    model = micro_llama(chatml)
    model.save_pretrained(tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == [chatml.convert_tokens_to_ids("<|im_end|>"),
                                                                      chatml.eos_token_id]


class ScriptedHead(torch.nn.Module):
    """An LM head that makes generation write `script`, one token per call, then EOS: a model whose answers are
    known in advance."""

    def __init__(self, vocab: int, script: list[int], eos: int):
        super().__init__()
        self.vocab, self.script, self.eos, self.calls = vocab, script, eos, 0

    def forward(self, hidden):
        token = self.script[self.calls] if self.calls < len(self.script) else self.eos
        self.calls += 1
        logits = torch.full((*hidden.shape[:-1], self.vocab), -1e4)
        logits[..., token] = 1e4
        return logits


def test_evaluation_stops_at_the_turn_end_and_keeps_a_pad_id_token_inside_the_answer(chatml):
    """A ChatML model (turn end <|im_end|>, EOS another token) that writes the pad id inside its answer: the
    answer ends at <|im_end|> (not at EOS, which it never writes), and the pad-id token is a real token of it."""
    model = micro_llama(chatml)
    film, pad, im_end = (chatml.convert_tokens_to_ids(t) for t in ("film", "<|pad|>", "<|im_end|>"))
    model.lm_head = ScriptedHead(len(chatml), [film, pad, film, im_end], chatml.convert_tokens_to_ids("a"))
    queries = torch.tensor([chatml.apply_chat_template([{"role": "user", "content": "hi"}],
                                                       add_generation_prompt=True, return_dict=False)])
    rollouts = sample(model, chatml, queries, max_new_tokens=8, temperature=1.0)
    answer = rollouts.query_responses[0, rollouts.context_length:].tolist()
    assert answer == [film, pad, film, im_end]  # generation stopped at the turn end
    assert rollouts.has_eos.tolist() == [True]
    assert rollouts.attention_mask[0, rollouts.context_length:].tolist() == [True] * 4  # the pad id included
    assert response_lengths(rollouts).tolist() == [4.0]


def test_forward_on_a_padded_row_equals_the_row_alone_even_with_the_pad_id_inside_the_answer(chatml):
    """The fix for log-probs shifted by a sampled pad-id token: a left-padded query + an answer holding the pad
    id + right padding gives the same logits on the real tokens as the unpadded row (the mask once built from
    `ids != pad_token_id` masked that token and moved every position after it)."""
    model = micro_llama(chatml)
    pad, end = chatml.pad_token_id, chatml.convert_tokens_to_ids("<|im_end|>")
    words = [chatml.convert_tokens_to_ids(w) for w in ("hi", "a", "review", "film")]
    query, answer = words[:2], [words[2], pad, words[3], end]
    row = torch.tensor([[pad, pad, *query, *answer, pad, pad]])
    mask = rollout.attention_mask(row, 4, pad, [end, chatml.eos_token_id])
    assert mask.tolist() == [[False, False, True, True, True, True, True, True, False, False]]
    with torch.no_grad():
        padded = rollout.forward(model, row, mask).logits[0, 2:8]
        alone = model(torch.tensor([query + answer])).logits[0]
        from_pad_id = rollout.forward(model, row, row != pad).logits[0, 2:8]  # the mask main once built
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(from_pad_id[3:], alone[3:], atol=1e-3)  # every position after the pad-id token moved


def test_lora_targets_that_match_nothing_are_named_with_the_model_layers(chatml):
    model = micro_llama(chatml)
    gpt2_names = ModelConfig(use_peft=True, lora_target_modules=["c_attn", "c_proj", "c_fc"])
    with pytest.raises(ValueError, match=r"match no module of 'micro' \(LlamaForCausalLM\); its linear layers are "
                                         r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj: "
                                         r"set lora_target_modules to all-linear"):
        check_lora_targets(model, gpt2_names, "micro")
    for targets in ("all-linear", ["q_proj", "v_proj"], ".*self_attn.q_proj"):
        check_lora_targets(model, ModelConfig(use_peft=True, lora_target_modules=targets), "micro")
    check_lora_targets(model, ModelConfig(use_peft=False, lora_target_modules=["c_attn"]), "micro")  # no LoRA


def test_kind_check_accepts_what_auto_model_for_causal_lm_maps_a_type_to(tmp_path):
    """Gemma 3 (4B and up) is a Gemma3ForConditionalGeneration, which AutoModelForCausalLM loads: a causal LM."""
    config = Gemma3Config()
    config.architectures = ["Gemma3ForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    check_model_kind(str(tmp_path), CAUSAL_LM, "model_name_or_path")


def test_ppo_wrapper_takes_transformers_activation_checkpointing_call(chatml):
    """transformers 5.25's Trainer calls activation_checkpointing_enable(..., every_n_layers=, offload=); the
    PPO wrapper passes it to the policy and the value model (it once crashed on the unknown keyword)."""
    from transformers import LlamaForSequenceClassification

    policy = micro_llama(chatml)
    value = LlamaForSequenceClassification(LlamaConfig(**{**policy.config.to_dict(), "num_labels": 1}))
    wrapper = PolicyAndValue(policy, value)
    wrapper.activation_checkpointing_enable(activation_checkpointing_kwargs=None, every_n_layers=1, offload=False)
    assert policy.is_activation_checkpointing and value.is_activation_checkpointing
    assert wrapper.is_gradient_checkpointing
    wrapper.gradient_checkpointing_disable()  # TRL's generation helpers use the older names
    assert not policy.is_activation_checkpointing and not value.is_activation_checkpointing
    wrapper.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert policy.is_activation_checkpointing  # the Trainer's own call: tests/test_shipped_recipes.py (gpt2-hh)


def test_generate_and_chat_stop_at_the_turn_end(chatml):
    """`generate` and `chat` (pipeline.decoding) stop a ChatML model's answer at <|im_end|>, which is not EOS."""
    from pipeline.decoding import Decoding, chat, generate

    model = micro_llama(chatml)
    im_end, film = chatml.convert_tokens_to_ids("<|im_end|>"), chatml.convert_tokens_to_ids("film")
    model.lm_head = ScriptedHead(len(chatml), [film, im_end], film)  # then "film" forever, had it not stopped
    greedy = Decoding(strategy="greedy", max_new_tokens=6)
    assert generate(model, chatml, [[{"role": "user", "content": "hi"}]], greedy) == ["film"]
    model.lm_head.calls = 0
    lines = ["hi"]

    def read(prompt):
        if not lines:
            raise EOFError  # Ctrl-D: the chat ends
        return lines.pop()

    conversation = chat(model, chatml, greedy, read=read, write=lambda text: None)
    assert conversation[-1] == {"role": "assistant", "content": "film"}
