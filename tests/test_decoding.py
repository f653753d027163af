"""Decoding modes through transformers' generate, and the chat loop."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.decoding import Decoding, chat, generate
from pipeline.models import fit_to_tokenizer, train_tokenizer

PROMPT = [{"role": "user", "content": "Write a review of The Lost River."}]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tokenizer = train_tokenizer(["Write a review of The Lost River. It felt superb and moving."] * 40, vocab_size=300)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=128)
    model = fit_to_tokenizer(GPT2LMHeadModel(config), tokenizer).eval()
    model.generation_config.eos_token_id = None  # a random model: never stop early, so lengths are known
    return tokenizer, model


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_greedy_is_the_argmax_at_every_step(setup):
    tokenizer, model = setup
    decoding = Decoding(strategy="greedy", max_new_tokens=6)
    config = decoding.generation_config(tokenizer)
    config.eos_token_id = None
    ids = torch.tensor([tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    manual = ids
    for _ in range(6):
        manual = torch.cat([manual, model(manual).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, manual)


def test_sampling_is_seeded_and_top_k_one_is_greedy(setup):
    tokenizer, model = setup
    sample = Decoding(strategy="sample", temperature=1.0, max_new_tokens=8)
    torch.manual_seed(1)
    first = generate(model, tokenizer, [PROMPT] * 4, sample)
    torch.manual_seed(1)
    assert generate(model, tokenizer, [PROMPT] * 4, sample) == first
    assert len(set(first)) > 1  # different samples for the same prompt
    top1 = Decoding(strategy="sample", top_k=1, max_new_tokens=8)
    assert generate(model, tokenizer, [PROMPT], top1) == generate(model, tokenizer, [PROMPT],
                                                                 Decoding(strategy="greedy", max_new_tokens=8))


def test_beam_search_of_width_one_is_greedy_and_repetition_penalty_stops_repeats(setup):
    tokenizer, model = setup
    greedy = Decoding(strategy="greedy", max_new_tokens=10)
    assert generate(model, tokenizer, [PROMPT], Decoding(strategy="beam", num_beams=1, max_new_tokens=10)) == \
        generate(model, tokenizer, [PROMPT], greedy)
    beam = Decoding(strategy="beam", num_beams=4, max_new_tokens=10, repetition_penalty=1e6)
    config = beam.generation_config(tokenizer)
    assert config.num_beams == 4 and not config.do_sample
    ids = torch.tensor([tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, ids.shape[1]:]
    new = [t for t in out.tolist() if t != tokenizer.pad_token_id]
    assert len(new) == len(set(new)) and not set(new) & set(ids[0].tolist())


def test_unknown_strategy_is_rejected(setup):
    with pytest.raises(ValueError, match="unknown decoding strategy 'nucleus'"):
        Decoding(strategy="nucleus").generation_config(setup[0])


def test_chat_keeps_the_conversation_and_resets(setup):
    tokenizer, model = setup
    seen = []
    lines = iter(["hello", "/reset", "first", "second", "/quit", "never read"])
    conversation = chat(model, tokenizer, Decoding(strategy="greedy", max_new_tokens=4), read=lambda _: next(lines),
                        write=seen.append)
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in conversation if m["role"] == "user"] == ["first", "second"]
    assert "(conversation reset)" in seen and sum(s.startswith("model> ") for s in seen) == 3
