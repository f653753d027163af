"""Tokenizers and models: the GPT-2 details that TRL leaves to the user.

- GPT-2 has no pad token, and pad = EOS makes TRL mask real EOS tokens (SFT labels, PPO's reward and
  truncation). We add a distinct `<|pad|>` token and resize the embeddings.
- GPT-2 has no chat template. We set one in the style of Anthropic's hh-rlhf transcripts, identical for
  every model of a run, so conversational datasets work and a PPO query is what the reward model saw.
- The policy, reference, reward and value models must share one tokenizer: `check_same_tokenizer`.
"""

import os

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)
from trl import ModelConfig, get_quantization_config

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# "\n\nHuman: ...\n\nAssistant: ...<eos>": the generation prompt ends at "Assistant:", so a prompt's
# tokens are always a prefix of the prompt + completion's tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\n\nAssistant: ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)


class TokenizerMismatchError(ValueError):
    pass


def require_local_or_hub(path: str, what: str = "model") -> None:
    """Fail clearly on a local path that does not exist, instead of a Hub lookup error."""
    if os.path.exists(path):
        return
    head = path.split("/")[0]
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.isdir(head)
    if looks_local:
        raise FileNotFoundError(f"{what} path '{path}' does not exist (has the stage that writes it run?)")


def train_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`, with EOS, a distinct pad and our chat template."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN, PAD_TOKEN])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, model_max_length=1024,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def prepare_tokenizer(tokenizer):
    """Give a GPT-2 tokenizer a pad token distinct from EOS and a chat template (no-ops when present)."""
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token; set one before training")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str, model_args: ModelConfig | None = None, padding_side: str = "right"):
    require_local_or_hub(path, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(
        path,
        revision=model_args.model_revision if model_args else "main",
        trust_remote_code=bool(getattr(model_args, "trust_remote_code", False)),
        padding_side=padding_side,
    )
    return prepare_tokenizer(tokenizer)


def model_kwargs(model_args: ModelConfig) -> dict:
    """from_pretrained kwargs from TRL's ModelConfig (dtype, revision, attention, quantization)."""
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=getattr(model_args, "trust_remote_code", False),
        attn_implementation=model_args.attn_implementation,
        dtype=dtype,
    )
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": int(os.environ.get("LOCAL_RANK", 0))})
    return kwargs


def fit_to_tokenizer(model, tokenizer):
    """Resize embeddings for added tokens and write pad/EOS ids into the config and generation config."""
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_causal_lm(path: str, tokenizer, model_args: ModelConfig):
    require_local_or_hub(path)
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs(model_args))
    return fit_to_tokenizer(model, tokenizer)


def load_scalar_head_model(path: str, tokenizer, model_args: ModelConfig):
    """A reward or value model: the transformer with a 1-output `score` head (new if `path` is an LM)."""
    require_local_or_hub(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **model_kwargs(model_args))
    return fit_to_tokenizer(model, tokenizer)


def _fingerprint(tokenizer) -> dict:
    return {
        "vocabulary": tokenizer.get_vocab(),
        "eos token": tokenizer.eos_token,
        "pad token": tokenizer.pad_token,
        "chat template": tokenizer.chat_template,
    }


def check_same_tokenizer(tokenizers: dict) -> None:
    """Raise TokenizerMismatchError naming the models and the first thing that differs."""
    (first_name, first), *others = tokenizers.items()
    reference = _fingerprint(first)
    for name, tokenizer in others:
        for key, value in _fingerprint(tokenizer).items():
            if value != reference[key]:
                raise TokenizerMismatchError(
                    f"the {name} tokenizer differs from the {first_name} tokenizer in its {key}; "
                    "the policy, reference, reward and value models must share one tokenizer"
                )
