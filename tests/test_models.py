"""GPT-2 details: a distinct pad token, one chat template, and the tokenizer-match check."""

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pipeline.models import (
    CHAT_TEMPLATE, PAD_TOKEN, TokenizerMismatchError, check_same_tokenizer, fit_to_tokenizer, load_tokenizer,
    prepare_tokenizer, require_local_or_hub, train_tokenizer,
)

TEXTS = ["The Lost River is a superb drama.", "Write a review of The Iron Crown.", "It felt dull."] * 50


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def gpt2_like(tokenizer):
    """A copy with GPT-2's situation: EOS, no pad token, no chat template."""
    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(
        tokenizer.backend_tokenizer.to_str()), eos_token="<|endoftext|>")
    assert plain.pad_token is None and plain.chat_template is None
    return plain


def test_trained_tokenizer_has_distinct_pad_and_template(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_prepare_adds_a_pad_token_that_is_not_eos(tokenizer):
    plain = gpt2_like(tokenizer)
    prepare_tokenizer(plain)
    assert plain.pad_token == PAD_TOKEN and plain.pad_token_id != plain.eos_token_id
    assert plain.chat_template == CHAT_TEMPLATE


def test_prepare_replaces_pad_equal_to_eos(tokenizer):
    plain = gpt2_like(tokenizer)
    plain.pad_token = plain.eos_token
    prepare_tokenizer(plain)
    assert plain.pad_token_id != plain.eos_token_id


def test_fit_to_tokenizer_resizes_and_sets_ids(tokenizer):
    plain = gpt2_like(tokenizer)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(plain), n_layer=1, n_embd=16, n_head=2))
    prepare_tokenizer(plain)
    fit_to_tokenizer(model, plain)
    assert model.get_input_embeddings().weight.shape[0] == len(plain)
    assert model.config.pad_token_id == plain.pad_token_id
    assert model.generation_config.eos_token_id == plain.eos_token_id


def test_chat_template_prompt_tokens_prefix_the_full_conversation(tokenizer):
    prompt = [{"role": "user", "content": "Write a review of The Iron Crown."}]
    full = prompt + [{"role": "assistant", "content": "It felt dull."}]
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(full, return_dict=False)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[-1] == tokenizer.eos_token_id


def test_same_tokenizer_passes_and_differences_are_named(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "a")
    check_same_tokenizer({"policy": tokenizer, "reward": load_tokenizer(str(tmp_path / "a"))})
    other = train_tokenizer(TEXTS[:30] + ["completely different words here"] * 20, vocab_size=280)
    with pytest.raises(TokenizerMismatchError, match="reward tokenizer differs from the policy tokenizer in its vocabulary"):
        check_same_tokenizer({"policy": tokenizer, "reward": other})
    templated = load_tokenizer(str(tmp_path / "a"))
    templated.chat_template = "{{ messages }}"
    with pytest.raises(TokenizerMismatchError, match="value tokenizer .* chat template"):
        check_same_tokenizer({"policy": tokenizer, "value": templated})


def test_missing_local_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="'outputs/nowhere/sft' does not exist"):
        require_local_or_hub("outputs/nowhere/sft")
    require_local_or_hub("openai-community/gpt2")  # a Hub id is left to the Hub


def test_gpt2_tanh_gelu_runs_fused_only_in_the_loaded_model(tokenizer, tmp_path):
    """GPT-2's "gelu_new" is loaded as PyTorch's fused tanh GELU (same outputs to float rounding, for the causal LM
    and the scalar-head model alike); the config, and so what is saved, keeps the model's own activation; a Llama
    (SiLU) is loaded untouched."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.activations import GELUTanh, NewGELUActivation
    from trl import ModelConfig

    from pipeline.models import load_causal_lm, load_scalar_head_model
    from tests.families import write_family_model

    torch.manual_seed(0)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer))).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    ids = torch.randint(0, len(tokenizer), (2, 12))
    model_args = ModelConfig()
    for load, plain_class, kwargs in ((load_causal_lm, AutoModelForCausalLM, {}),
                                      (load_scalar_head_model, AutoModelForSequenceClassification, {"num_labels": 1})):
        torch.manual_seed(1)  # the scalar head is new: the same random one in both
        plain = fit_to_tokenizer(plain_class.from_pretrained(gpt2, **kwargs), tokenizer).eval()
        torch.manual_seed(1)
        loaded = load(str(gpt2), tokenizer, model_args).eval()
        acts = [type(block.mlp.act) for block in loaded.transformer.h]
        assert acts == [GELUTanh, GELUTanh] and type(plain.transformer.h[0].mlp.act) is NewGELUActivation
        with torch.no_grad():
            expected, got = plain(ids).logits, loaded(ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        loaded.save_pretrained(tmp_path / load.__name__)
        assert '"activation_function": "gelu_new"' in (tmp_path / load.__name__ / "config.json").read_text()

    llama = write_family_model("llama3-untied", tmp_path / "llama")
    llama_tokenizer = load_tokenizer(str(llama))
    torch.manual_seed(1)  # rows the tokenizer adds are drawn at random: the same ones in both
    plain = fit_to_tokenizer(AutoModelForCausalLM.from_pretrained(llama), llama_tokenizer).eval()
    torch.manual_seed(1)
    loaded = load_causal_lm(str(llama), llama_tokenizer, model_args).eval()
    assert [type(m) for m in loaded.modules()] == [type(m) for m in plain.modules()]
    ids = torch.randint(0, len(llama_tokenizer), (2, 12))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, loaded(ids).logits)
