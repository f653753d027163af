"""Tokenizers and models: the GPT-2 details that TRL leaves to the user.

- GPT-2 has no pad token, and pad = EOS makes TRL mask real EOS tokens (SFT labels, PPO's reward and
  truncation). We add a distinct `<|pad|>` token and resize the embeddings.
- GPT-2 has no chat template. We set one in the style of Anthropic's hh-rlhf transcripts, identical for
  every model of a run, so conversational datasets work and a PPO query is what the reward model saw.
- The policy, reference, reward and value models must share one tokenizer: `check_same_tokenizer`.
- LoRA (`use_peft`): a stage saves its adapter in `<output_dir>/adapter` and the merged model in `<output_dir>`
  (`merge_adapter`); the loaders also take an adapter folder (its base model + the adapter, merged).
- 4-bit / 8-bit loading (`load_in_4bit`, bitsandbytes) needs a CUDA GPU: `model_kwargs` says so in one line.
"""

import json
import logging
import math
import os
import shutil
from contextlib import contextmanager

import torch
from transformers import (
    AutoConfig,
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

# ChatML, as Qwen's models write it: every turn ends with <|im_end|>, which is not EOS
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_FORMATS = {  # a new tokenizer's chat template and the special tokens it needs
    "hh": (CHAT_TEMPLATE, []),
    "chatml": (CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"]),
}


class TokenizerMismatchError(ValueError):
    pass


def require_local_or_hub(path: str, what: str = "model path") -> None:
    """Fail clearly on a local path that does not exist, or is a file, instead of a Hub lookup error."""
    if os.path.isfile(path):
        raise ValueError(f"{what} '{path}' is a file, not a model folder: give the folder that holds the model's "
                         "config.json (a stage's output_dir) or a Hub model id")
    if os.path.exists(path):
        return
    head = path.split("/")[0]
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.isdir(head)
    if looks_local:
        raise FileNotFoundError(f"{what} '{path}' does not exist (has the stage that writes it run?)")


def train_tokenizer(texts, vocab_size: int, chat_format: str = "hh") -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`, with EOS, a distinct pad and a chat template:
    `hh` (ours: turns end with EOS) or `chatml` (Qwen's: turns end with <|im_end|>, a token of its own)."""
    from tokenizers import ByteLevelBPETokenizer

    template, extra = CHAT_FORMATS[chat_format]
    specials = [EOS_TOKEN, PAD_TOKEN, *extra]
    bpe = ByteLevelBPETokenizer()
    # a special token written in a text (a transcript's end of turn) is one token: no merges are learned from it
    def plain(text):
        for token in specials:
            text = text.replace(token, " ")
        return text
    bpe.train_from_iterator((plain(text) for text in texts), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, model_max_length=1024, additional_special_tokens=extra or None,
    )
    tokenizer.chat_template = template
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
    require_local_or_hub(path, "tokenizer path")
    tokenizer = AutoTokenizer.from_pretrained(
        path,
        revision=model_args.model_revision if model_args else "main",
        trust_remote_code=bool(getattr(model_args, "trust_remote_code", False)),
        padding_side=padding_side,
    )
    return prepare_tokenizer(tokenizer)


def check_quantization(model_args: ModelConfig) -> None:
    """4-bit / 8-bit loading (QLoRA) is a GPU-only option: fail in one line where it cannot work."""
    bits = "4-bit" if getattr(model_args, "load_in_4bit", False) else "8-bit" if getattr(
        model_args, "load_in_8bit", False) else None
    if bits is None:
        return
    if not torch.cuda.is_available():
        raise ValueError(f"{bits} loading needs a CUDA GPU and bitsandbytes; this machine has no CUDA GPU "
                         f"(remove load_in_{bits[0]}bit from the recipe to train in {model_args.dtype})")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"{bits} loading needs a CUDA GPU and bitsandbytes: pip install bitsandbytes") from None
    if not model_args.use_peft:
        raise ValueError(f"{bits} weights cannot be trained directly: set use_peft: true (QLoRA trains LoRA "
                         "adapters on the quantized model)")


def model_kwargs(model_args: ModelConfig) -> dict:
    """from_pretrained kwargs from TRL's ModelConfig (dtype, revision, attention, quantization)."""
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    check_quantization(model_args)
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


_SENTINEL = "\u2063reply\u2063"  # an assistant turn's text that no template writes itself


def turn_end_token_id(tokenizer) -> int | None:
    """The token the chat template writes right after an assistant turn's text (ChatML's `<|im_end|>`, Llama 3's
    `<|eot_id|>`, Gemma's `<end_of_turn>`, our template's EOS), when that is one special token; else None."""
    if not tokenizer.chat_template:
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": _SENTINEL}], tokenize=False)
    except Exception:  # a template that cannot render this conversation (e.g. it insists on a system turn)
        return None
    if _SENTINEL not in text:
        return None
    after = text.split(_SENTINEL, 1)[1].lstrip(" ")
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    return ids[0] if ids and ids[0] in special and ids[0] != tokenizer.pad_token_id else None


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The tokens that end an answer: the end of an assistant turn as the chat template writes it, the ids the
    model's generation config already stops at, and EOS; the turn end first. Never the pad token."""
    ids = [turn_end_token_id(tokenizer)]
    # a generation config written for the model (Llama 3 Instruct's lists <|eot_id|>); one derived from the model's
    # config only repeats its EOS, which may be a random config's default
    written = generation_config is not None and not getattr(generation_config, "_from_model_config", False)
    configured = getattr(generation_config, "eos_token_id", None) if written else None
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    ids.append(tokenizer.eos_token_id)
    stops = []
    for token in ids:
        if token is not None and token != tokenizer.pad_token_id and int(token) not in stops:
            stops.append(int(token))
    return stops


def fit_to_tokenizer(model, tokenizer):
    """Resize embeddings for added tokens and write pad/EOS ids into the config; the generation config stops at
    every token that ends an answer (`stop_token_ids`), so `generate`, TRL's GRPO/RLOO and plain transformers
    stop at the end of an assistant turn even where the template does not end turns with EOS."""
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        stops = stop_token_ids(tokenizer, model.generation_config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    return model


class ModelKindError(ValueError):
    pass


CAUSAL_LM, SCALAR_HEAD = "causal-lm", "scalar-head"
ROLE_HINTS = {  # what to point a field at, by the kind it needs
    CAUSAL_LM: "point it at a policy (the pretrain or SFT stage's output_dir, or a Hub causal LM)",
    SCALAR_HEAD: "point it at the reward stage's output_dir",
}


def model_kind(path: str, model_args: ModelConfig | None = None) -> tuple[str, str]:
    """(kind, what the checkpoint is) from its config alone, nothing loaded: kind is CAUSAL_LM, SCALAR_HEAD (a
    1-output sequence classifier: a reward or value model), "classifier" (more labels) or "other"."""
    if is_adapter(path):
        with open(os.path.join(path, ADAPTER_CONFIG)) as f:
            task = json.load(f).get("task_type")
        return {"CAUSAL_LM": CAUSAL_LM, "SEQ_CLS": SCALAR_HEAD}.get(task, "other"), f"a LoRA adapter ({task})"
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelKindError(f"'{path}' holds no model (no config.json or {ADAPTER_CONFIG}): is it the output_dir "
                             "of a stage that finished, or the folder above it?")
    config = AutoConfig.from_pretrained(path, revision=getattr(model_args, "model_revision", None) or "main",
                                        trust_remote_code=getattr(model_args, "trust_remote_code", False))
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architecture = (config.architectures or [""])[0]
    mapped = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    mapped = (mapped,) if isinstance(mapped, str) else tuple(mapped or ())
    if architecture.endswith("ForSequenceClassification"):
        kind = SCALAR_HEAD if config.num_labels == 1 else "classifier"
    elif architecture.endswith(("ForCausalLM", "LMHeadModel")) or architecture in mapped:
        kind = CAUSAL_LM  # what AutoModelForCausalLM itself loads, e.g. Gemma 3's *ForConditionalGeneration
    else:
        kind = CAUSAL_LM if not architecture and mapped else "other"
    return kind, architecture or f"a {config.model_type} config"


KIND_WORDS = {CAUSAL_LM: "a causal language model", SCALAR_HEAD: "a reward model",
              "classifier": "a classifier with several labels", "other": "another kind of model"}


def check_model_kind(path: str, need: str, field: str = "model", model_args: ModelConfig | None = None,
                     allow: tuple[str, ...] = ()) -> None:
    """Fail in one line when the checkpoint at `path` is not the kind of model its role needs (`need`: CAUSAL_LM
    for a policy or reference, SCALAR_HEAD for a reward or value model; `allow`: other kinds accepted too), naming
    the field it was given in. Reads only the config."""
    require_local_or_hub(path, field)
    try:
        kind, what = model_kind(path, model_args)
    except ModelKindError as error:
        raise ModelKindError(f"{field} {error}") from None
    if kind != need and kind not in allow:
        random_head = "its score head would be random; " if need == SCALAR_HEAD and kind == CAUSAL_LM else ""
        raise ModelKindError(f"{field} '{path}' is {KIND_WORDS[kind]} ({what}), not {KIND_WORDS[need]}: "
                             f"{random_head}{ROLE_HINTS[need]}")


def _text_config(path: str, model_args: ModelConfig | None):
    """The (text) config of the model at `path`, an adapter's base model's for an adapter; None if unreadable (the
    loading reports that itself)."""
    try:
        if is_adapter(path):
            path = adapter_base(path)
        config = AutoConfig.from_pretrained(path, revision=getattr(model_args, "model_revision", None) or "main",
                                            trust_remote_code=getattr(model_args, "trust_remote_code", False))
    except Exception:  # noqa: BLE001
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


POSITION_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")


def context_length(config) -> tuple[int | None, str | None, bool]:
    """(positions, the config field that says so, whether they are a hard limit). Learned position embeddings
    (GPT-2, OPT) have one row per position: a longer sequence is an index error. Rotary (Llama, Qwen, Mistral,
    GPT-NeoX, ...) or ALiBi positions have no table: a longer sequence runs, beyond what the model was trained on."""
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            break
    else:
        return None, None, False
    relative = any(getattr(config, a, None) not in (None, False) for a in (
        "rope_parameters", "rope_scaling", "rope_theta", "rotary_dim", "rotary_pct", "rotary_emb_base", "alibi"))
    relative = relative or getattr(config, "position_embedding_type", None) in ("rotary", "alibi")
    return value, name, not relative


# per stage: the models whose context the sequences must fit, and the settings that make up a sequence's length
LENGTHS = {
    "sft": (("model_name_or_path",), ("max_length",)),
    "reward": (("model_name_or_path",), ("max_length",)),
    "dpo": (("model_name_or_path",), ("max_length",)),
    "ppo": (("sft_model_path", "reward_model_path"), ("max_prompt_length", "response_length")),
    "grpo": (("model_name_or_path", "reward_model_path"), ("max_prompt_length", "max_completion_length")),
    "rloo": (("model_name_or_path", "reward_model_path"), ("max_prompt_length", "max_completion_length")),
}


def _setting(name: str, *args):
    return next((getattr(a, name) for a in args if getattr(a, name, None) is not None), None)


def check_gradient_checkpointing(stage: str, script_args, training_args, model_args) -> None:
    """`gradient_checkpointing: true` (TRL's default) on a model class that cannot do it (OpenAI GPT, CTRL, XLNet,
    ...): transformers would refuse when training starts, without naming the field."""
    import transformers
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    causal, scalar = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    trained = {"reward": [("model_name_or_path", scalar)],  # the models the stage trains, and as what
               "ppo": [("sft_model_path", causal), ("reward_model_path", scalar)]}.get(
        stage, [("model_name_or_path", causal)])
    for field, mapping in trained:
        path = _setting(field, script_args, training_args, model_args)
        config = _text_config(path, model_args) if path else None
        name = mapping.get(getattr(config, "model_type", None))
        name = name[0] if isinstance(name, (list, tuple)) else name
        model_class = getattr(transformers, name, None) if name else None
        if model_class is not None and not getattr(model_class, "supports_gradient_checkpointing", True):
            raise ValueError(f"gradient_checkpointing is true, but {model_class.__name__} ({field} '{path}') does not "
                             "support it: set gradient_checkpointing: false")


def check_before_loading(stage: str, script_args, training_args, model_args) -> None:
    """Right after the model kinds are checked, before anything is loaded (the models' configs only): the stage's
    lengths must fit the models' context (a sequence longer than GPT-2's n_positions is an IndexError deep in
    training; rotary models have no hard limit: a warning only), token-id settings (PPO's stop_token_id) must be
    tokens of the vocabulary, and the recipe's reward functions must import (their module's own errors named with
    file and line) and take prompts= and completions=."""
    if getattr(script_args, "reward_functions", None):
        from .rl import load_reward_functions

        load_reward_functions(script_args.reward_functions, script_args.reward_function_weights)
    if getattr(training_args, "gradient_checkpointing", False):
        check_gradient_checkpointing(stage, script_args, training_args, model_args)
    tokens = {name: getattr(training_args, name) for name in ("pad_token", "eos_token")
              if isinstance(getattr(training_args, name, None), str)}  # TRL's SFT, reward and DPO fields
    if tokens and getattr(model_args, "model_name_or_path", None):
        path = model_args.model_name_or_path
        tokenizer = load_tokenizer(path, model_args)  # as the stage loads it: with the pipeline's <|pad|>
        for name, token in tokens.items():
            if token not in tokenizer.get_vocab():
                shown = ", ".join(repr(t) for t in tokenizer.all_special_tokens[:6])
                raise ValueError(f"{name} {token!r} is not a token of the tokenizer of model_name_or_path '{path}' "
                                 f"(its special tokens: {shown}): name one of its tokens, or leave {name} out (the "
                                 "pipeline gives the tokenizer a pad token of its own and keeps its EOS)")
    if stage not in LENGTHS:
        return
    paths, length_fields = LENGTHS[stage]
    settings = {}
    for name in length_fields:
        for args in (script_args, training_args, model_args):
            if getattr(args, name, None) is not None:
                settings[name] = getattr(args, name)
                break
    if len(settings) < len(length_fields):  # e.g. max_length: null (no truncation): nothing to compare
        return
    total = sum(settings.values())
    spelled = " + ".join(f"{name} {value}" for name, value in settings.items())
    spelled += f" = {total} tokens" if len(settings) > 1 else ""
    ptx = getattr(script_args, "ptx_block_size", None) if getattr(script_args, "ptx_coef", 0) else None
    stop_token_id = getattr(training_args, "stop_token_id", None)
    for field in paths:
        path = next((getattr(a, field) for a in (script_args, training_args, model_args)
                     if getattr(a, field, None)), None)
        config = _text_config(path, model_args) if path else None
        if config is None:
            continue
        positions, where, hard = context_length(config)
        model = f"{field} '{path}' ({where} {positions})"
        if positions is not None and total > positions:
            fix = (f"set {length_fields[0]} to at most {positions}" if len(settings) == 1
                   else f"lower them to add up to at most {positions}")
            if hard:
                raise ValueError(f"{spelled} is longer than the {positions} positions of {model}: {fix}")
            logger.warning(f"{spelled} is longer than the {positions} positions {model} was trained on: its rotary "
                           f"positions run on, untrained beyond {positions} ({fix} to stay within them)")
        if ptx and positions is not None and hard and ptx > positions and field == paths[0]:
            raise ValueError(f"ptx_block_size {ptx} is longer than the {positions} positions of {model}: set "
                             f"ptx_block_size to at most {positions}")
        vocabulary = getattr(config, "vocab_size", None)
        if stop_token_id is not None and field == paths[0] and vocabulary and not 0 <= stop_token_id < vocabulary:
            raise ValueError(f"stop_token_id {stop_token_id} is not a token of the vocabulary of {field} '{path}' "
                             f"(ids 0 to {vocabulary - 1}): set a token id of that range, or stop_token: eos")


def fused_tanh_gelu(model):
    """GPT-2's activation as PyTorch's fused kernel. GPT-2 (and GPT-Neo, GPT-J, CodeGen) compute their tanh GELU
    ("gelu_new", "gelu_fast") as about seven elementwise operations each way, 30% of a PPO run's operator time at a
    6-layer x 512 GPT-2 on the CPU; `F.gelu(approximate="tanh")` is the same function in one (transformers' own
    GELUTanh, "gelu_pytorch_tanh"), equal to float rounding (3.6e-7 in logits of 1.6). The modules are swapped in
    the loaded model only: its config, and so every saved checkpoint, still names the model's own activation."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())
    return model


def load_causal_lm(path: str, tokenizer, model_args: ModelConfig, field: str = "model_name_or_path"):
    check_model_kind(path, CAUSAL_LM, field, model_args)
    if is_adapter(path):
        model = _load_merged(path, tokenizer, model_args, AutoModelForCausalLM)
    else:
        model = fit_to_tokenizer(AutoModelForCausalLM.from_pretrained(path, **model_kwargs(model_args)), tokenizer)
    check_lora_targets(model, model_args, path)
    return fused_tanh_gelu(model)


def load_scalar_head_model(path: str, tokenizer, model_args: ModelConfig, field: str | None = None):
    """A reward or value model: the transformer with a 1-output `score` head. With `field` (a role that needs a
    trained head: the reward model to train against or evaluate), `path` must hold one; without it (the reward
    stage's starting point), a causal LM gets a new head."""
    check_model_kind(path, SCALAR_HEAD, field or "model_name_or_path", model_args, allow=() if field else (CAUSAL_LM,))
    if is_adapter(path):
        model = _load_merged(path, tokenizer, model_args, AutoModelForSequenceClassification, num_labels=1)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **model_kwargs(model_args))
        model = fit_to_tokenizer(model, tokenizer)
    if field is None:  # a model this stage trains (LoRA adapters included); a frozen reward model gets none
        check_lora_targets(model, model_args, path)
    return fused_tanh_gelu(model)


def load_reward_model(path: str, policy_tokenizer, model_args: ModelConfig, field: str = "reward_model_path"):
    """A frozen reward model to train against or score with, and its tokenizer, which must be the policy's
    (TokenizerMismatchError otherwise): (model in eval mode, tokenizer)."""
    check_model_kind(path, SCALAR_HEAD, field, model_args)
    tokenizer = load_tokenizer(path, model_args)
    check_same_tokenizer({"policy": policy_tokenizer, "reward": tokenizer})
    return load_scalar_head_model(path, tokenizer, model_args, field).eval(), tokenizer


ENSEMBLE_DIR = "ensemble"  # in a reward model's folder: the other members of its ensemble (reward ensemble_size)


def ensemble_members(path: str) -> list[str]:
    """The folders of the other members of the reward model at `path`'s ensemble, in order (none: [])."""
    folder = os.path.join(path, ENSEMBLE_DIR)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    members = [os.path.join(folder, n) for n in names if n.startswith("member-") and n[7:].isdigit()]
    return sorted((m for m in members if os.path.isfile(os.path.join(m, "config.json"))),
                  key=lambda m: int(os.path.basename(m)[7:]))


def require_ensemble(path: str) -> list[str]:
    """ensemble_members(path), or a one-line error where the reward stage trained none (checked before loading)."""
    members = ensemble_members(path)
    if not members:
        raise ValueError(f"reward_ensemble needs the reward model's ensemble, and {path} has none "
                         f"({os.path.join(path, ENSEMBLE_DIR)}/member-<i>): train the reward stage with ensemble_size: "
                         "3 (or more), or set reward_ensemble: off")
    return members


def load_ensemble(path: str, policy_tokenizer, model_args: ModelConfig) -> list:
    """The other members of the ensemble of the reward model at `path`, frozen (reward_ensemble; the reward model
    itself is loaded as it always is)."""
    return [load_reward_model(member, policy_tokenizer, model_args, f"reward ensemble member {member}")[0]
            for member in require_ensemble(path)]


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


# ---------------------------------------------------------------------------------------------------- LoRA

ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output head, in any architecture


def _targets_match(name: str, targets) -> bool:
    """peft's rule: a string is a regular expression over the full module name; a list names modules by their
    last components (`c_attn` matches `transformer.h.0.attn.c_attn`)."""
    import re

    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith("." + target) for target in targets)


def check_lora_targets(model, model_args: ModelConfig, path: str) -> None:
    """With `use_peft`, fail in one line when `lora_target_modules` names no module of the model (a recipe written
    for another architecture: GPT-2's `c_attn` is `q_proj`/`k_proj`/`v_proj` in Llama), naming the model's
    linear layers and `all-linear`, which fits every architecture."""
    if not getattr(model_args, "use_peft", False):
        return
    targets = model_args.lora_target_modules
    if isinstance(targets, (list, tuple)) and len(targets) == 1:
        targets = targets[0]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"})
    architecture = type(model).__name__
    if targets is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        if model.config.model_type in DEFAULTS:
            return
        raise ValueError(f"lora_target_modules is not set and peft has no default for {architecture}: set it to "
                         f"{ALL_LINEAR} or to some of its linear layers ({', '.join(linear)})")
    if not any(_targets_match(name, targets) for name, _ in model.named_modules()):
        raise ValueError(f"lora_target_modules {targets} match no module of '{path}' ({architecture}); its linear "
                         f"layers are {', '.join(linear)}: set lora_target_modules to {ALL_LINEAR} (every linear "
                         "layer but the output head, in any architecture) or to some of those names")


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"  # a LoRA stage's adapter: <output_dir>/adapter; the merged model is <output_dir> itself

logger = logging.getLogger("pipeline")


def is_adapter(path: str) -> bool:
    """A local folder holding a PEFT adapter (adapter_config.json) rather than a whole model (config.json)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(path, "config.json"))


def adapter_base(path: str, base_model: str | None = None) -> str:
    """The base model an adapter was trained on (its adapter_config.json), checked to exist."""
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        base = base_model or json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"adapter '{path}' does not name its base model; pass it (merge --base_model PATH)")
    try:
        require_local_or_hub(base, f"base model of the adapter '{path}':")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; point at the merged model instead (the stage's output_dir), or merge "
                                f"with `python -m pipeline merge {path} OUT --base_model PATH`") from None
    return base


def _load_merged(path: str, tokenizer, model_args: ModelConfig, auto_class, base_model: str | None = None,
                 **kwargs):
    """An adapter folder as a plain model: its base model (resized to the tokenizer), the adapter, merged. Under
    DeepSpeed ZeRO-3 the merge needs whole weights: each process loads them whole (whole_weights), and DeepSpeed
    shards the merged model when the trainer prepares it."""
    from peft import PeftModel

    if getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False):
        raise ValueError(f"'{path}' is a LoRA adapter; with 4-bit/8-bit loading point at its merged model "
                         "(the stage's output_dir) instead")
    base = adapter_base(path, base_model)
    causal = auto_class is AutoModelForCausalLM
    check_model_kind(base, CAUSAL_LM if causal else SCALAR_HEAD, f"the base model of the adapter '{path}'", model_args,
                     allow=() if causal else (CAUSAL_LM,))  # a reward model's adapter sits on the SFT policy
    logger.info(f"{path} is a LoRA adapter: loading its base model {base}, the adapter, and merging them")
    with whole_weights():
        model = fit_to_tokenizer(auto_class.from_pretrained(base, **kwargs, **model_kwargs(model_args)), tokenizer)
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
        # peft loads an adapter for inference, every weight frozen; from_pretrained's models train in full
        return fit_to_tokenizer(model.requires_grad_(True), tokenizer)


def merge_adapter(adapter_path: str, output_dir: str, base_model: str | None = None, dtype: str = "auto",
                  overwrite: bool = False) -> str:
    """Write the merged model (base + adapter, one plain transformers checkpoint) and the tokenizer to
    `output_dir`. A reward model's adapter (task SEQ_CLS) merges into a 1-label sequence classifier."""
    if not is_adapter(adapter_path):
        raise ValueError(f"'{adapter_path}' is not a LoRA adapter folder (no {ADAPTER_CONFIG}, or it holds a "
                         "whole model: config.json)")
    if not overwrite and os.path.isdir(output_dir) and os.listdir(output_dir):
        held = sorted(os.listdir(output_dir))
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise FileExistsError(f"'{output_dir}' already holds files ({shown}): merge writes a new folder; give it one "
                              "that does not exist or is empty")
    with open(os.path.join(adapter_path, ADAPTER_CONFIG)) as f:
        task = json.load(f).get("task_type")
    has_tokenizer = os.path.isfile(os.path.join(adapter_path, "tokenizer_config.json"))
    tokenizer = load_tokenizer(adapter_path if has_tokenizer else adapter_base(adapter_path, base_model))
    model_args = ModelConfig(dtype=dtype)
    if task == "SEQ_CLS":
        model = _load_merged(adapter_path, tokenizer, model_args, AutoModelForSequenceClassification, base_model,
                             num_labels=1)
    else:
        model = _load_merged(adapter_path, tokenizer, model_args, AutoModelForCausalLM, base_model)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def _same_model(path: str, other: str) -> bool:
    """Whether two model paths name the same model: the same local folder (however written), or the same Hub id."""
    if os.path.exists(path) and os.path.exists(other):
        return os.path.samefile(path, other)
    return path.rstrip("/") == other.rstrip("/")


def _safetensors_index(folder: str) -> dict[str, str] | None:
    """Tensor name -> file of a safetensors checkpoint (one file or shards); None for any other format."""
    from safetensors import safe_open

    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        with safe_open(single, "pt") as f:
            return {key: single for key in f.keys()}
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {key: os.path.join(folder, name) for key, name in json.load(f)["weight_map"].items()}
    return None


ADAPTER_PREFIX = "base_model.model."  # how peft names an adapter's tensors in its file


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class _SafetensorsRows:
    """The tensors of a safetensors checkpoint (`_safetensors_index`), read some rows at a time with plain file
    reads: the file's pages go to the page cache, not into this process's memory as safe_open's memory map would put
    them (checking two model-sized files would otherwise raise the process's peak RSS by both their sizes)."""

    def __init__(self, index: dict[str, str]):
        self.index, self.headers = index, {}

    def spec(self, key: str):
        """(file, offset of its data, dtype, shape)."""
        file = self.index[key]
        if file not in self.headers:
            with open(file, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                self.headers[file] = (8 + length, json.loads(f.read(length)))
        start, header = self.headers[file]
        entry = header[key]
        return file, start + entry["data_offsets"][0], _SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"] or [1]

    def rows(self, key: str, first: int, last: int) -> torch.Tensor:
        file, offset, dtype, shape = self.spec(key)
        row = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        with open(file, "rb") as f:
            f.seek(offset + first * row)
            data = bytearray(f.read((last - first) * row))
        return torch.frombuffer(data, dtype=dtype).reshape(last - first, *shape[1:])


def _merged_differs(merged_dir: str, adapter_dir: str, base_dir: str, config: dict) -> str | None:
    """Why the merged model in `merged_dir` is not the model in `base_dir` plus the LoRA adapter in `adapter_dir`
    (None: it is, to float rounding), read from the files a block of rows at a time (a few MB of memory): every
    weight of the merged model is the base model's, plus scaling x B @ A where the adapter has LoRA matrices, and
    its head is the adapter's. Adapter variants this plain formula does not cover (DoRA, rank or alpha patterns,
    trained biases) are not checked: a reason is returned."""
    from safetensors.torch import load_file

    variants = [name for name in ("use_dora", "rank_pattern", "alpha_pattern", "lora_bias", "layer_replication",
                                  "target_parameters", "trainable_token_indices") if config.get(name)]
    if config.get("bias", "none") != "none":
        variants.append(f"bias: {config['bias']}")
    if variants:
        return f"its adapter uses {', '.join(variants)}, which the check does not cover"
    merged, base = _safetensors_index(merged_dir), _safetensors_index(base_dir)
    adapter_file = os.path.join(adapter_dir, "adapter_model.safetensors")
    for index, what in ((merged, "its merged model"), (base, "sft_model_path"),
                        (os.path.isfile(adapter_file) or None, "its adapter")):
        if index is None:
            return f"the check reads local safetensors files, and {what} has none"
    adapter = load_file(adapter_file)  # the LoRA matrices and the head: small
    heads = set(config.get("modules_to_save") or ())
    scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    transposed = bool(config.get("fan_in_fan_out"))  # GPT-2's Conv1D keeps its weight as (in, out)
    pairs, expected_heads = {}, {}
    for key, tensor in adapter.items():
        name = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key
        if name.endswith(".lora_A.weight"):
            module = name[:-len(".lora_A.weight")]
            up = adapter.get(f"{ADAPTER_PREFIX}{module}.lora_B.weight")
            if up is None:
                return f"its adapter has no lora_B matrix for {module}"
            pairs[f"{module}.weight"] = (tensor.float(), up.float())
        elif name.endswith(".lora_B.weight"):
            continue
        elif name.split(".")[0] in heads:
            expected_heads[name] = tensor
        else:
            return f"its adapter holds {key}, beside the LoRA matrices and the head"
    if not pairs or not any(name.split(".")[0] == "score" for name in expected_heads):
        return "its adapter has no LoRA matrices or no score head"
    merged, base = _SafetensorsRows(merged), _SafetensorsRows(base)
    try:
        for key in merged.index:
            _, _, dtype, shape = merged.spec(key)
            if key in expected_heads:
                if not torch.equal(merged.rows(key, 0, shape[0]).reshape(expected_heads[key].shape),
                                   expected_heads[key].to(dtype)):
                    return f"{key} is not the adapter's head"
                continue
            if key not in base.index:
                return f"the SFT model has no tensor {key}"
            _, _, base_dtype, base_shape = base.spec(key)
            if base_shape != shape:
                return f"{key} has shape {tuple(shape)}, not the SFT model's {tuple(base_shape)}"
            step = max(1, (1 << 22) // math.prod(shape[1:]))  # rows per block: 4M values, 16 MB in float32
            for first in range(0, shape[0], step):
                last = min(shape[0], first + step)
                saved, expected = merged.rows(key, first, last), base.rows(key, first, last)
                if not (saved.is_floating_point() and expected.is_floating_point()):
                    if not torch.equal(saved, expected):
                        return f"{key} is not the SFT model's"
                    continue
                if key not in pairs and dtype == base_dtype and torch.equal(saved, expected):
                    continue  # a weight no LoRA matrix moves, as it should be: bit for bit
                delta = torch.zeros(())
                if key in pairs:
                    down, up = pairs[key]  # A (r, in), B (out, r): the weight moves by scaling x B @ A
                    delta = (down[:, first:last].T @ up.T if transposed else up[first:last] @ down) * scaling
                expected = expected.float() + delta
                eps = max(torch.finfo(dtype).eps, torch.finfo(base_dtype).eps)  # the merge ran in the files' precision
                if ((expected - saved.float()).abs() > 8 * eps * (expected.abs() + delta.abs()) + 1e-7).any():
                    return f"{key} is not the SFT model's plus the adapter's"
    except (KeyError, ValueError, OSError, RuntimeError) as error:
        return f"its files could not be compared ({type(error).__name__}: {error})"
    missing = (set(pairs) | set(expected_heads)) - set(merged.index)
    if missing:
        return f"the merged model has no {sorted(missing)[0]}, which the adapter adapts"
    return None


def reward_adapter_on(reward_model_path: str, sft_model_path: str) -> tuple[str | None, str]:
    """Whether the reward model at `reward_model_path` is a LoRA adapter on the SFT model at `sft_model_path`, which
    PPO with LoRA then runs as one more adapter on the policy's own base weights (`share_base_model`). Returns (the
    adapter's folder or None, what the reward model is, in words for the log).

    It is when `reward_model_path` is (or holds in adapter/, as the reward stage with use_peft writes it) a LoRA
    adapter of task SEQ_CLS with a `score` head, whose base model (adapter_config.json's base_model_name_or_path)
    is the folder or Hub id `sft_model_path` names, and, where the merged model is beside it, the merged model's
    weights are the SFT model's plus the adapter's (`_merged_differs`: an SFT folder trained again after the reward
    stage fails this, and the reward model is then loaded whole, as it scored). Reads files only, a tensor at a
    time."""
    adapter = reward_model_path if is_adapter(reward_model_path) else os.path.join(reward_model_path, ADAPTER_DIR)
    if not is_adapter(adapter):
        return None, "a whole reward model (no LoRA adapter)"
    with open(os.path.join(adapter, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA" or config.get("task_type") != "SEQ_CLS":
        return None, f"an adapter of type {config.get('peft_type')}/{config.get('task_type')}, not LORA/SEQ_CLS"
    base = config.get("base_model_name_or_path") or ""
    if not base or not _same_model(base, sft_model_path):
        return None, f"a LoRA adapter on {base or 'an unnamed base model'}, not on sft_model_path"
    if adapter != reward_model_path:  # the merged model beside it is what a whole load would score with
        differs = _merged_differs(reward_model_path, adapter, sft_model_path, config)
        if differs is not None:
            return None, (f"a LoRA adapter on sft_model_path, but its merged model is not sft_model_path plus the "
                          f"adapter ({differs}; was sft_model_path trained again after the reward stage?)")
    return adapter, "a LoRA adapter on sft_model_path"


def _count(parameters) -> int:
    total = 0
    for parameter in parameters:
        n = parameter.numel() or getattr(parameter, "ds_numel", 0)  # DeepSpeed ZeRO-3 partitions
        total += n * 2 if parameter.__class__.__name__ == "Params4bit" else n  # two 4-bit values per byte
    return total


def parameter_counts(trainer) -> dict:
    """The parameters a trainer trained and the model's total. Trained = what its optimizer updates (without
    DeepSpeed, whose flat partitions do not count: there, the parameters that require a gradient). For PPO, the
    policy's own share too (the value model is trained in full, or on one base model is an adapter and a head:
    PolicyAndValue.value_parameters)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is not None and not getattr(trainer, "is_deepspeed_enabled", False):
        trained = list({id(p): p for group in optimizer.param_groups for p in group["params"]}.values())
    else:
        trained = [p for p in model.parameters() if p.requires_grad]
    counts = {"trainable_parameters": _count(trained), "total_parameters": _count(model.parameters())}
    if hasattr(model, "policy") and hasattr(model, "value_model"):
        value = {id(p) for p in model.value_parameters()}
        counts["policy_trainable_parameters"] = _count(p for p in trained if id(p) not in value)
        counts["policy_total_parameters"] = _count(model.policy_parameters())
    return counts


def peft_model(trainer):
    """The PeftModel a trainer trains (PPO: its policy), or None without LoRA."""
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    model = getattr(model, "policy", model)
    return model if isinstance(model, PeftModel) else None


@contextmanager
def whole_weights():
    """from_pretrained on one process of a DeepSpeed ZeRO-3 run, loading the weights whole. While ZeRO-3 is
    configured, transformers loads every model sharded across the processes (zero.Init), which waits for all of
    them: on the main process alone it would never return. The configuration is set again afterwards."""
    from transformers.integrations import (HfDeepSpeedConfig, deepspeed_config, is_deepspeed_zero3_enabled,
                                           unset_hf_deepspeed_config)

    if not is_deepspeed_zero3_enabled():
        yield
        return
    config = deepspeed_config()
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        # HfDeepSpeedConfig registers itself through a weak reference: the one registered last is kept alive here
        _REGISTERED["deepspeed_config"] = HfDeepSpeedConfig(config)


_REGISTERED = {}


def save_lora(trainer, model, output_dir: str) -> None:
    """A LoRA stage's outputs: the adapter (+ tokenizer) in <output_dir>/adapter, and in <output_dir> the merged
    model, a plain transformers checkpoint that the next stage and every command load as any other."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter_dir = os.path.join(output_dir, ADAPTER_DIR)
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        trainer.save_model(adapter_dir)
        if trainer.accelerator.is_main_process:
            with whole_weights():
                merge_adapter(adapter_dir, output_dir, overwrite=True)  # the stage's own folder
            value_model = os.path.join(adapter_dir, "value_model")  # PPO's: beside the merged policy
            if is_adapter(value_model):  # an adapter on the policy's base (share_base_model): kept, and merged
                with whole_weights():
                    merge_adapter(value_model, os.path.join(output_dir, "value_model"), overwrite=True)
            elif os.path.isdir(value_model):  # trained in full
                shutil.rmtree(os.path.join(output_dir, "value_model"), ignore_errors=True)
                shutil.move(value_model, os.path.join(output_dir, "value_model"))
    elif trainer.accelerator.is_main_process:  # the adapter was already merged into the weights, in place
        logger.warning(f"the LoRA adapter was merged into the model before saving: {output_dir} holds the merged "
                       "model, and no adapter folder could be written")
        model.get_base_model().save_pretrained(output_dir)
        trainer.processing_class.save_pretrained(output_dir)
    trainer.accelerator.wait_for_everyone()


def first_tokenizer_difference(tokenizer, other) -> str | None:
    """The first of vocabulary, EOS token, pad token and chat template in which two tokenizers differ (what
    check_same_tokenizer compares), or None when they are the same."""
    mine, theirs = _fingerprint(tokenizer), _fingerprint(other)
    return next((key for key in mine if mine[key] != theirs[key]), None)


def roles_not_rendered(tokenizer, roles=("system", "user", "assistant")) -> dict[str, str]:
    """The roles whose turns the tokenizer's chat template does not render, found by rendering a probe
    conversation (a system, a user and an assistant turn, each with a text of its own) and looking for each turn's
    text in the output: role -> why (its text is not in the output, or the template raises on it). A template that
    raises on the probe is tried again without the system turn (Gemma's, Mistral's refuse one)."""
    texts = {role: f"probe{index}text" for index, role in enumerate(roles)}
    probe = [{"role": role, "content": texts[role]} for role in roles]
    missing = {}
    while probe:
        try:
            rendered = tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception as error:  # jinja2's TemplateError from the template's raise_exception, or any other
            said = str(error).splitlines()[0] if str(error) else type(error).__name__
            if probe[0]["role"] == "system" and len(probe) > 1:
                missing["system"] = f"the chat template raises on it: {said}"
                probe = probe[1:]
                continue
            return {**missing, **{turn["role"]: f"the chat template raises: {said}" for turn in probe}}
        missing.update({turn["role"]: "the chat template leaves its text out" for turn in probe
                        if turn["content"] not in rendered})
        return missing
    return missing
