"""Decoding modes through transformers' generate, and the chat loop."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import run_python
from pipeline import decoding as decoding_module
from pipeline.decoding import HELP, Decoding, chat, generate
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


LONG_TURN = "the river felt superb and moving; " * 3  # about 45 tokens: a few turns overflow 128 positions


def reader(lines, stop=EOFError):
    """A `read` for chat: the lines, then `stop` (end of input, or Ctrl-C with KeyboardInterrupt)."""
    lines = iter(lines)

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise stop from None
    return read


def test_chat_cli_survives_a_conversation_longer_than_the_context(setup, tmp_path):
    tokenizer, model = setup
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    turns = "".join(f"turn {i}: {LONG_TURN}\n" for i in range(20))
    result = run_python("-m", "pipeline", "chat", tmp_path, "--max_new_tokens", "16", input=turns, check=False,
                        timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.count("model> ") == 20
    assert "(context: dropped the oldest turn to fit the model's 128 tokens)" in result.stdout


def test_chat_drops_whole_old_turns_and_cuts_a_message_too_long_alone(setup):
    tokenizer, model = setup
    seen = []
    lines = [f"turn {i}: {LONG_TURN}" for i in range(5)] + ["Write a review " * 60]
    conversation = chat(model, tokenizer, Decoding(strategy="greedy", max_new_tokens=16), read=reader(lines),
                        write=seen.append)
    assert any(s.startswith("(context: dropped the ") for s in seen)
    assert any(s.startswith("(context: kept the last 112 of the prompt's ") for s in seen)
    assert sum(s.startswith("model> ") for s in seen) == 6
    # what is left is whole turns ending with the long message, answered
    assert [m["role"] for m in conversation] == ["user", "assistant"]
    assert conversation[0]["content"] == ("Write a review " * 60).strip()


def test_chat_caps_max_new_tokens_that_fill_the_context_once(setup):
    tokenizer, model = setup
    seen = []
    chat(model, tokenizer, Decoding(strategy="greedy", max_new_tokens=500), read=reader(["hello", "again"]),
         write=seen.append)
    assert seen.count("(context: max_new_tokens 500 does not fit the model's 128 tokens; using 64)") == 1
    assert sum(s.startswith("model> ") for s in seen) == 2


def fake_generate(calls, interrupt_first=False):
    def answer(model, tokenizer, inputs, decoding, write=None):
        calls.append([dict(m) for m in inputs[0]])
        if interrupt_first and len(calls) == 1:
            raise KeyboardInterrupt
        return [f"answer {len(calls)}"]
    return answer


def chat_catching_ctrl_c(*args, **kwargs):
    """chat, with a KeyboardInterrupt that escapes it a test failure instead of the end of the test run."""
    try:
        return chat(*args, **kwargs)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the chat")


def test_chat_commands_are_not_sent_to_the_model(setup, monkeypatch):
    calls, seen = [], []
    monkeypatch.setattr(decoding_module, "generate", fake_generate(calls))
    lines = ["/foo", "/help", "//slash text", "/reset", "hi", "/exit", "never read"]
    conversation = chat(setup[1], setup[0], Decoding(), read=reader(lines), write=seen.append)
    assert "unknown command /foo; commands: /reset, /quit, /help" in seen
    assert HELP in seen
    assert [c[-1]["content"] for c in calls] == ["/slash text", "hi"]
    assert conversation == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "answer 2"}]


def test_ctrl_c_while_the_model_answers_cancels_only_that_answer(setup, monkeypatch):
    calls, seen = [], []
    monkeypatch.setattr(decoding_module, "generate", fake_generate(calls, interrupt_first=True))
    conversation = chat_catching_ctrl_c(setup[1], setup[0], Decoding(), read=reader(["first", "second"]),
                                        write=seen.append)
    assert "(interrupted)" in seen
    assert calls[1] == [{"role": "user", "content": "second"}]  # the unanswered turn is gone
    assert conversation == [{"role": "user", "content": "second"}, {"role": "assistant", "content": "answer 2"}]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, EOFError])
def test_ctrl_c_or_end_of_input_at_the_prompt_ends_the_chat(setup, monkeypatch, stop):
    calls = []
    monkeypatch.setattr(decoding_module, "generate", fake_generate(calls))
    conversation = chat_catching_ctrl_c(setup[1], setup[0], Decoding(), read=reader(["hello"], stop),
                                        write=lambda _: None)
    assert len(calls) == 1 and [m["role"] for m in conversation] == ["user", "assistant"]


def test_generate_cuts_prompts_longer_than_the_context_from_the_left(setup, monkeypatch):
    tokenizer, model = setup
    seen, prompts = [], []
    original = model.generate

    def spy(**batch):
        prompts.append(batch["input_ids"])
        return original(**batch)
    monkeypatch.setattr(model, "generate", spy)
    long_text = "Write a review of The Lost River. " * 20
    answers = generate(model, tokenizer, [long_text, [{"role": "user", "content": long_text}], "short"],
                       Decoding(strategy="greedy", max_new_tokens=16), write=seen.append)
    assert len(answers) == 3
    assert len(seen) == 2 and all(s.startswith("(context: kept the last 112 of prompt ") for s in seen)
    assert prompts[0].shape[1] == 112 and prompts[0][0].tolist() == ids_of(tokenizer, long_text)[-112:]
    assert len(generate(model, tokenizer, [""], Decoding(strategy="greedy", max_new_tokens=4))) == 1
