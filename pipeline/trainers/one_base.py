"""PPO with LoRA on one base model (`share_base_model`): on the policy's base weights, the policy's adapter, a value
adapter with a head of its own, and, when the reward model is a LoRA adapter on the SFT model (the reward stage
with use_peft), that adapter, frozen, with its head; the reference is the base with every adapter off. One copy
of the base weights for policy, reference, value and reward.

peft switches adapters with `set_adapter` and `disable_adapter`, which also set `requires_grad`: only the active
adapter trains. Here two adapters train in the same step, so `Adapters` switches with peft's calls and then gives
`requires_grad` back to both with peft's `set_requires_grad`: the optimizer and DDP (find_unused_parameters=False)
see the same trainable parameters all along, and each of them gets its gradient every step. With activation
checkpointing a layer's forward is recomputed in the backward pass, when another adapter may be active:
`Adapters.recompute_context` (torch's checkpoint `context_fn`) recomputes it under the adapter of the forward it
repeats.

`value_model/` (in checkpoints, and in <output_dir>/adapter/) is then the value adapter as peft writes a reward
model's: a LoRA adapter of task SEQ_CLS on the SFT model, its head in `modules_to_save` (`score`), so that
`PeftModel.from_pretrained(AutoModelForSequenceClassification...)`, the pipeline's loaders and `python -m pipeline
merge` read it as any reward-model adapter; `<output_dir>/value_model` holds it merged (a plain transformers
sequence classifier), as without LoRA.
"""

import copy
import os
from contextlib import contextmanager, nullcontext

import torch

# not substrings of any module name: peft picks an adapter's tensors out of a state dict by its name as a substring
VALUE_ADAPTER = "ppo_value"
REWARD_ADAPTER = "ppo_reward"
HEAD = "score"  # the head's name in a sequence classifier, which rollout.scalar_head reads
PREFIX = "base_model.model."  # how peft names an adapter's tensors in its files
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class Adapters:
    """Which adapter of a LoRA PeftModel runs: `use(name)` (None: every adapter off) for a block, then the one
    before; the adapters in `trained` keep `requires_grad` through every switch."""

    def __init__(self, model, trained):
        self.model, self.trained = model, list(trained)
        self.active = model.active_adapter  # None while every adapter is off

    def backbone(self):
        """The transformer under the LM head (GPT-2's `transformer`), its LoRA layers included."""
        base = self.model.get_base_model()
        return getattr(base, base.base_model_prefix)

    def keep_trained(self) -> None:
        self.model.set_requires_grad(self.trained, True)

    @contextmanager
    def use(self, name: str | None):
        previous = self.active
        if name == previous:
            yield self.model
            return
        if name is None:
            with self.model.disable_adapter():
                self.keep_trained()
                self.active = None
                try:
                    yield self.model
                finally:
                    self.active = previous
            self.keep_trained()  # peft's enable_adapter_layers set the active adapter alone trainable
            return
        self._set(name)
        try:
            yield self.model
        finally:
            self._set(previous)

    def _set(self, name: str) -> None:
        self.model.set_adapter(name, inference_mode=True)  # every adapter frozen ...
        self.keep_trained()  # ... and the trained ones trainable again
        self.active = name

    def recompute_context(self):
        """torch.utils.checkpoint's `context_fn`, called at a checkpointed layer's forward: (the forward's context,
        the recomputation's), the recomputation under the adapter active now."""
        return nullcontext(), self.use(self.active)


class AdapterScalarHead(torch.nn.Module):
    """A value or reward model as an adapter on the policy's base plus a 1-output head, read the way
    `rollout.scalar_head` reads a sequence classifier: `getattr(model, model.base_model_prefix)` is the backbone
    (here the policy's transformer, run with this adapter alone) and `model.score` the head. The backbone is not a
    submodule: its weights are the policy's, saved, moved and counted with it."""

    base_model_prefix = "backbone"

    def __init__(self, adapters: Adapters, adapter_name: str, score: torch.nn.Linear):
        super().__init__()
        self.score = score
        self.adapter_name = adapter_name
        self.adapters = adapters

    @property
    def config(self):
        return self.adapters.model.config

    def backbone(self, *args, **kwargs):
        with self.adapters.use(self.adapter_name):
            return self.adapters.backbone()(*args, **kwargs)


class AdapterView:
    """The LoRA policy with one adapter alone (None: every adapter off) as a model of its own: its calls and
    `generate` run under that adapter, everything else (config, generation_config, device, eval) is the policy's.
    The evaluation's SFT policy with LoRA: the base the policy trains on, with no copy of it loaded."""

    def __init__(self, adapters: Adapters, adapter_name: str | None = None):
        self.adapters, self.adapter_name = adapters, adapter_name

    def __call__(self, *args, **kwargs):
        with self.adapters.use(self.adapter_name):
            return self.adapters.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.adapters.use(self.adapter_name):
            return self.adapters.model.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.adapters.model, name)


def read_adapter(folder: str):
    """A LoRA adapter folder of task SEQ_CLS: (its LoraConfig without the head, its LoRA tensors as peft saved
    them, its `score` head's tensors by parameter name)."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(folder)
    weights = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
    head = {key[len(f"{PREFIX}{HEAD}."):]: weights.pop(key) for key in list(weights)
            if key.startswith(f"{PREFIX}{HEAD}.")}
    if "weight" not in head:
        raise ValueError(f"{folder} holds no {HEAD} head ({PREFIX}{HEAD}.weight): not a reward model's adapter")
    config.modules_to_save = None  # the head is a module of its own here, not one peft keeps a copy of
    return config, weights, head


def _linear(head: dict, dtype, device) -> torch.nn.Linear:
    weight = head["weight"]
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head, dtype=dtype, device=device)
    linear.load_state_dict(head)
    return linear


def _copy_head(score) -> dict:
    """A reward model's head as plain tensors (gathered, under DeepSpeed ZeRO-3)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    gathered = nullcontext()
    if is_deepspeed_zero3_enabled():
        import deepspeed
        gathered = deepspeed.zero.GatheredParameters(list(score.parameters()))
    with gathered:
        return {name: tensor.detach().clone() for name, tensor in score.state_dict().items()}


def load_lora_weights(model, weights: dict, adapter_name: str, source: str) -> None:
    """peft's set_peft_model_state_dict, refusing tensors that match nothing and adapter weights left unloaded."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    missing = [key for key in result.missing_keys if f".{adapter_name}." in key]
    if result.unexpected_keys or missing:
        raise ValueError(f"{source} does not fit the policy's base model: "
                         + (f"{result.unexpected_keys[0]} matches no layer" if result.unexpected_keys
                            else f"no tensor for {missing[0]}"))


def attach(policy, reward_model=None, reward_adapter: str | None = None):
    """Put the value adapter (and the reward adapter, from its folder) on the LoRA policy. The value model starts as
    the reward model does: with `reward_adapter`, a trainable copy of it (LoRA weights and head); else a new LoRA
    adapter of the policy's settings (which starts as the base model) under a copy of `reward_model`'s head.
    Returns (Adapters, value model, reward model: the adapter's or `reward_model`)."""
    policy_adapter = policy.active_adapter
    taken = {VALUE_ADAPTER, REWARD_ADAPTER} & set(policy.peft_config)
    if taken:
        raise ValueError(f"the policy already has an adapter named {sorted(taken)[0]}")
    embeddings = policy.get_input_embeddings().weight
    dtype, device = embeddings.dtype, embeddings.device if embeddings.numel() else None
    if reward_adapter is not None:
        config, weights, head = read_adapter(reward_adapter)
        reward_config = copy.deepcopy(config)
        reward_config.inference_mode = True
        policy.add_adapter(REWARD_ADAPTER, reward_config)
        load_lora_weights(policy, weights, REWARD_ADAPTER, reward_adapter)
        value_config, value_weights = copy.deepcopy(config), weights
    else:
        if reward_model is None:
            raise ValueError("the value model starts from the reward model: pass reward_model or reward_adapter")
        value_config, value_weights = copy.deepcopy(policy.peft_config[policy_adapter]), None
        head = _copy_head(reward_model.score)
    value_config.inference_mode = False
    policy.add_adapter(VALUE_ADAPTER, value_config)
    if value_weights is not None:
        load_lora_weights(policy, value_weights, VALUE_ADAPTER, reward_adapter)
    adapters = Adapters(policy, [policy_adapter, VALUE_ADAPTER])
    adapters._set(policy_adapter)  # the policy runs unless a block says otherwise; both trained adapters train
    value = AdapterScalarHead(adapters, VALUE_ADAPTER, _linear(head, dtype, device).requires_grad_(True))
    if reward_adapter is not None:
        reward_model = AdapterScalarHead(adapters, REWARD_ADAPTER, _linear(head, dtype, device).requires_grad_(False))
        reward_model.eval()
    return adapters, value, reward_model


def adapter_parameters(model, adapter_name: str) -> list:
    """The LoRA parameters of one adapter of a PeftModel."""
    return [p for name, p in model.named_parameters() if f".{adapter_name}." in name and "lora_" in name]


def save_value_model(adapters: Adapters, folder: str, policy_state: dict, head_state: dict) -> None:
    """The value adapter and its head in `folder`, as a reward model's adapter on the policy's base model (see the
    module's docstring). `policy_state`: the policy's state dict (gathered whole under ZeRO-3)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    model = adapters.model
    weights = get_peft_model_state_dict(model, state_dict=policy_state, adapter_name=VALUE_ADAPTER,
                                        save_embedding_layers=False)
    weights.update({f"{PREFIX}{HEAD}.{name}": tensor for name, tensor in head_state.items()})
    os.makedirs(folder, exist_ok=True)
    save_file({key: tensor.detach().cpu().contiguous() for key, tensor in weights.items()},
              os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[VALUE_ADAPTER])
    config.task_type, config.modules_to_save, config.inference_mode = "SEQ_CLS", [HEAD], True
    config.base_model_name_or_path = model.peft_config[adapters.trained[0]].base_model_name_or_path
    config.save_pretrained(folder)


def load_value_model(adapters: Adapters, value_model: AdapterScalarHead, folder: str) -> None:
    """What `save_value_model` wrote, back into the value adapter and head."""
    _, weights, head = read_adapter(folder)
    load_lora_weights(adapters.model, weights, VALUE_ADAPTER, folder)
    value_model.score.load_state_dict(head)
    adapters.keep_trained()


def load_policy_adapter(adapters: Adapters, folder: str) -> None:
    """A checkpoint's policy adapter (peft's save_pretrained of the policy's adapter alone) back into it."""
    from safetensors.torch import load_file

    name = adapters.trained[0]
    load_lora_weights(adapters.model, load_file(os.path.join(folder, ADAPTER_WEIGHTS)), name, folder)
    adapters.keep_trained()
