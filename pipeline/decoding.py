"""Decoding through transformers' `generate`: greedy, sampling (temperature, top-k, top-p) and beam search
(with repetition penalty), for a prompt or a conversation kept in the model's chat template."""

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

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

    def generation_config(self, tokenizer) -> GenerationConfig:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown decoding strategy {self.strategy!r}; one of {', '.join(STRATEGIES)}")
        common = dict(max_new_tokens=self.max_new_tokens, repetition_penalty=self.repetition_penalty,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if self.strategy == "greedy":
            return GenerationConfig(do_sample=False, num_beams=1, **common)
        if self.strategy == "sample":
            return GenerationConfig(do_sample=True, temperature=self.temperature, top_k=self.top_k,
                                    top_p=self.top_p, **common)
        return GenerationConfig(do_sample=False, num_beams=self.num_beams, early_stopping=True, **common)


@torch.no_grad()
def generate(model, tokenizer, inputs: list, decoding: Decoding) -> list[str]:
    """Answers to prompts: each input is a conversation (list of messages, answered through the chat
    template's generation prompt) or a plain string (continued as is)."""
    ids = [tokenizer.apply_chat_template(x, add_generation_prompt=True, return_dict=False) if isinstance(x, list)
           else tokenizer(x)["input_ids"] for x in inputs]
    batch = tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt").to(model.device)
    output = model.generate(**batch, generation_config=decoding.generation_config(tokenizer))
    return [text.strip() for text in tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:],
                                                             skip_special_tokens=True)]


def chat(model, tokenizer, decoding: Decoding, read=input, write=print) -> list[dict]:
    """An interactive conversation: every turn goes through the chat template with the whole history.
    `/reset` starts over, `/quit` (or end of input) stops. Returns the conversation."""
    messages = []
    write("chat: type a message; /reset starts over, /quit ends")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            break
        if line == "/quit":
            break
        if line == "/reset":
            messages = []
            write("(conversation reset)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        answer = generate(model, tokenizer, [messages], decoding)[0]
        messages.append({"role": "assistant", "content": answer})
        write(f"model> {answer}")
    return messages
