"""CPU speed-ups that keep the maths: pipeline.lm_head (whole logits give what TRL's tiled LM head gives, and only
where they are small) and the embedded model's fused tanh GELU."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from trl.trainer.utils import add_fused_lm_head

from pipeline.lm_head import is_materialised, materialise_small_logits

OUTPUTS = ("log_probs", "entropy", "is_top1")


def _model(seed=0, temperature=1.0, **config):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_layer=2, n_head=2, n_embd=32, n_positions=40,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                            bos_token_id=0, eos_token_id=0, **config))
    add_fused_lm_head(model, temperature=temperature, outputs=OUTPUTS)
    return model


def _batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 97, (3, 20), generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[2, 12:] = -100  # padding
    return input_ids, labels


@pytest.mark.parametrize("num_items_in_batch, temperature, labelled_only", [(None, 1.0, False), (50, 0.7, True)])
def test_whole_logits_match_trl_tiled_head_and_its_gradients(num_items_in_batch, temperature, labelled_only):
    """SFT's way (logits at every position), and GRPO's (at its sampling temperature, which TRL's head divides the
    logits by; logits only where a label is; the entropy's gradient included)."""
    tiled, whole = _model(temperature=temperature), _model(temperature=temperature)
    assert materialise_small_logits(whole, temperature=temperature, labelled_only=labelled_only)
    input_ids, labels = _batch()
    with torch.no_grad():  # row 1's labels are the model's own top-1 tokens: is_top1 is compared on hits too
        labels[1, 1:] = tiled(input_ids=input_ids).logits[1, :-1].argmax(-1)
    outputs = [model(input_ids=input_ids, labels=labels, fused_lm_head=True, num_items_in_batch=num_items_in_batch)
               for model in (tiled, whole)]
    for field in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(outputs[1][field], outputs[0][field], rtol=1e-5, atol=1e-6)
    assert torch.equal(outputs[1].is_top1.bool(), outputs[0].is_top1.bool())
    assert torch.equal(outputs[1].label_mask, outputs[0].label_mask)
    assert outputs[1].is_top1[1].all()
    for output in outputs:
        (output.loss + output.entropy.sum() if labelled_only else output.loss).backward()
    for (name, a), (_, b) in zip(tiled.named_parameters(), whole.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def _spy_on_trl(model, calls: list):
    """Record the `fused_lm_head` flag of every call that reaches the forward TRL patched onto `model`."""
    trl_forward = model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("fused_lm_head"))
        return trl_forward(*args, **kwargs)

    model.__dict__["forward"] = spy


def test_large_logits_and_plain_calls_go_to_trl():
    model, calls = _model(), []
    _spy_on_trl(model, calls)
    input_ids, labels = _batch()
    assert materialise_small_logits(model, max_logits_bytes=3 * 19 * 97 * 4)  # the batch's logits fit exactly
    model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert calls == []
    model(input_ids=input_ids, labels=labels)  # the model's own forward (generation, evaluation of logits)
    assert calls == [False]

    tight = _model()  # one byte less than the batch's logits: TRL's tiles
    _spy_on_trl(tight, calls)
    assert materialise_small_logits(tight, max_logits_bytes=3 * 19 * 97 * 4 - 1)
    tight(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert calls == [False, True]

    scored = int((labels[:, 1:] != -100).sum())  # 45 of the 57 positions: GRPO's logits only where a label is
    labelled = _model()
    _spy_on_trl(labelled, calls)
    assert materialise_small_logits(labelled, max_logits_bytes=scored * 97 * 4, labelled_only=True)
    labelled(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert calls == [False, True]  # whole: they fit


def test_a_lora_wrapped_lm_head_goes_to_trl():
    """TRL's tiles read the head's bare weight; a LoRA-wrapped head called as a module would add its adapter, so
    the two would train different things: such a head is left to TRL."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_model(), LoraConfig(r=2, target_modules=["lm_head"]))
    base, calls = peft_model.get_base_model(), []
    _spy_on_trl(base, calls)
    assert materialise_small_logits(base) and is_materialised(peft_model)
    input_ids, labels = _batch()
    base(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert calls == [True]


def test_models_trl_did_not_patch_or_that_cap_their_logits_are_left_alone():
    torch.manual_seed(0)
    plain = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_layer=1, n_head=2, n_embd=32, n_positions=40))
    assert not materialise_small_logits(plain)
    assert "forward" not in plain.__dict__
    capped = _model()
    capped.config.final_logit_softcapping = 30.0
    forward = capped.forward
    assert not materialise_small_logits(capped)
    assert capped.forward is forward


def test_the_fused_tanh_gelu_of_the_embedded_model_is_gpt2s_gelu_new():
    """pipeline/stages/pretrain.py builds its GPT-2 with activation_function "gelu_pytorch_tanh" (one fused kernel)
    instead of GPT2Config's default "gelu_new" (the same formula in seven elementwise ops): the same function."""
    from transformers.activations import ACT2FN

    x = torch.linspace(-8, 8, 10001, requires_grad=True)
    new, fused = ACT2FN["gelu_new"](x), ACT2FN["gelu_pytorch_tanh"](x)
    torch.testing.assert_close(fused, new, rtol=0, atol=1e-6)
    grads = [torch.autograd.grad(y.sum(), x)[0] for y in (new, fused)]
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-5)
