"""Decoding through transformers' `generate`: greedy, sampling (temperature, top-k, top-p) and beam search
(with repetition penalty), for a prompt or a conversation kept in the model's chat template."""

import sys
from dataclasses import dataclass, replace

# torch and transformers load when a model is used: the command line reads the defaults below without them

STRATEGIES = ("greedy", "sample", "beam")


@dataclass
class Decoding:
    strategy: str = "sample"
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 4
    repetition_penalty: float = 1.0

    def check(self) -> "Decoding":
        """Refuse settings out of range, naming the command-line flag, the value and the valid range (before any
        model is loaded; transformers' own messages name its parameters, or fail with a traceback)."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown decoding strategy {self.strategy!r}; one of {', '.join(STRATEGIES)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be greater than 0, got {self.temperature} (it divides the logits; "
                             "for greedy answers use --strategy greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top_k must be at least 0 (0: no top-k filter), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be greater than 0 and at most 1 (1: no top-p filter), got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"--repetition_penalty must be greater than 0 (1: no penalty), got "
                             f"{self.repetition_penalty}")
        if self.num_beams < 1:
            raise ValueError(f"--num_beams must be at least 1, got {self.num_beams}")
        return self

    def generation_config(self, tokenizer, model_generation_config=None):
        """The GenerationConfig of these settings, stopping at the end of an assistant turn as the chat template
        writes it, at the ids `model_generation_config` stops at, and at EOS (models.stop_token_ids)."""
        from transformers import GenerationConfig

        from .models import stop_token_ids

        self.check()
        common = dict(max_new_tokens=self.max_new_tokens, repetition_penalty=self.repetition_penalty,
                      eos_token_id=stop_token_ids(tokenizer, model_generation_config),
                      pad_token_id=tokenizer.pad_token_id)
        if self.strategy == "greedy":
            return GenerationConfig(do_sample=False, num_beams=1, **common)
        if self.strategy == "sample":
            return GenerationConfig(do_sample=True, temperature=self.temperature, top_k=self.top_k,
                                    top_p=self.top_p, **common)
        return GenerationConfig(do_sample=False, num_beams=self.num_beams, early_stopping=True, **common)


def context_length(model, tokenizer) -> int | None:
    """How many positions the model reads: its config's n_positions or max_position_embeddings, else the
    tokenizer's model_max_length when it is a real limit; None when unknown."""
    for name in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(model.config, name, None), int):
            return getattr(model.config, name)
    length = getattr(tokenizer, "model_max_length", None)
    return length if isinstance(length, int) and length < 1_000_000 else None


def fit_decoding(decoding: Decoding, context: int | None, write) -> Decoding:
    """`decoding` with max_new_tokens capped to half the context when it leaves no room for a prompt."""
    if context is None or decoding.max_new_tokens < context:
        return decoding
    write(f"(context: max_new_tokens {decoding.max_new_tokens} does not fit the model's {context} tokens; "
          f"using {context // 2})")
    return replace(decoding, max_new_tokens=context // 2)


def _prompt_ids(tokenizer, x) -> list[int]:
    if isinstance(x, list):
        return tokenizer.apply_chat_template(x, add_generation_prompt=True, return_dict=False)
    return tokenizer(x)["input_ids"]


def _stderr(text):
    print(text, file=sys.stderr)


def generate(model, tokenizer, inputs: list, decoding: Decoding, write=_stderr) -> list[str]:
    """Answers to prompts: each input is a conversation (list of messages, answered through the chat
    template's generation prompt) or a plain string (continued as is). A prompt that does not fit in the
    model's context with max_new_tokens is cut from the left, with a line through `write`."""
    import torch

    with torch.no_grad():
        return _generate(model, tokenizer, inputs, decoding, write)


def _generate(model, tokenizer, inputs, decoding, write):
    context = context_length(model, tokenizer)
    decoding = fit_decoding(decoding, context, write)
    ids = [_prompt_ids(tokenizer, x) for x in inputs]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [x or ([start] if start is not None else x) for x in ids]  # an empty prompt starts from BOS
    if context is not None:
        room = context - decoding.max_new_tokens
        for i, x in enumerate(ids):
            if len(x) > room:
                name = f"prompt {i + 1}" if len(ids) > 1 else "the prompt"
                write(f"(context: kept the last {room} of {name}'s {len(x)} tokens to fit the model's {context} "
                      f"tokens with {decoding.max_new_tokens} new ones)")
                ids[i] = x[-room:]
    batch = tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt").to(model.device)
    config = decoding.generation_config(tokenizer, getattr(model, "generation_config", None))
    output = model.generate(**batch, generation_config=config)
    return [text.strip() for text in tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:],
                                                             skip_special_tokens=True)]


HELP = ("commands: /reset starts over, /quit (or /exit, Ctrl-D) ends, /help lists these; "
        "Ctrl-C stops an answer; a line starting with // is sent starting with /")


def fit_history(tokenizer, messages: list[dict], room: int) -> tuple[list[dict], int]:
    """The most recent turns of `messages` (ending with a user message) whose prompt fits in `room` tokens,
    and how many turns (user+assistant pairs) were dropped; a leading system message is kept."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    dropped = 0
    while len(body) > 1 and len(_prompt_ids(tokenizer, head + body)) > room:
        body = body[2:]
        dropped += 1
    return head + body, dropped


def chat(model, tokenizer, decoding: Decoding, read=input, write=print) -> list[dict]:
    """An interactive conversation: every turn goes through the chat template with the history that fits in
    the model's context (older turns are dropped). `/reset` starts over, `/quit`, end of input or Ctrl-C at
    the prompt stops; Ctrl-C while the model answers cancels that answer. Returns the conversation."""
    context = context_length(model, tokenizer)
    decoding = fit_decoding(decoding, context, write)
    messages = []
    write("chat: type a message; /reset starts over, /quit ends, /help lists the commands")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("")
            break
        if line.startswith("/") and not line.startswith("//"):
            command = line.split()[0]
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                messages = []
                write("(conversation reset)")
            elif command == "/help":
                write(HELP)
            else:
                write(f"unknown command {command}; commands: /reset, /quit, /help")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line[1:] if line.startswith("//") else line})
        if context is not None:
            messages, dropped = fit_history(tokenizer, messages, context - decoding.max_new_tokens)
            if dropped:
                turns = f"{dropped} oldest turns" if dropped > 1 else "oldest turn"
                write(f"(context: dropped the {turns} to fit the model's {context} tokens)")
        try:
            answer = generate(model, tokenizer, [messages], decoding, write=write)[0]
        except KeyboardInterrupt:
            messages.pop()
            write("(interrupted)")
            continue
        messages.append({"role": "assistant", "content": answer})
        write(f"model> {answer}")
    return messages
