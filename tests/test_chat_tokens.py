"""A chat is rendered to token ids once (issue 26): a tokenizer that adds BOS itself (Llama 2/3, Mistral, Gemma)
gets one BOS per conversation in reward evaluation and in PPO-ptx blocks, as the RewardTrainer and SFT saw it."""

import pytest
import torch
from datasets import Dataset
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForSequenceClassification

from pipeline.evaluate import score_texts
from pipeline.models import CHAT_TEMPLATE, train_tokenizer
from pipeline.rl import PtxBatches

TEXTS = ["Write a review of The Lost River. It felt superb.", "What did you think of The Iron Crown? It felt dull.",
         "Tell me about The Silent Harbour. A slow, lovely film."] * 100
CONVERSATIONS = [
    [{"role": "user", "content": "Write a review of The Lost River."},
     {"role": "assistant", "content": "It felt superb."}],
    [{"role": "user", "content": "What did you think of The Iron Crown?"},
     {"role": "assistant", "content": "It felt dull, and far too long for what it had to say."}],
]


def own_tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def bos_tokenizer():
    """Our tokenizer made to add BOS itself, as Llama's does: `<s>` before every text it encodes with special
    tokens, and a chat template that starts with `{{ bos_token }}`."""
    tokenizer = own_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", bos)])
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    return tokenizer


class Recording(torch.nn.Module):
    """A reward model that records the unpadded input_ids of every row it scores."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    @property
    def device(self):
        return self.model.device

    def forward(self, input_ids, attention_mask):
        self.seen += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def reward_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    return Recording(LlamaForSequenceClassification(config).eval())


def test_the_test_tokenizer_adds_bos_itself():
    tokenizer = bos_tokenizer()
    bos = tokenizer.bos_token_id
    ids = tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=True, return_dict=False)
    assert ids[0] == bos and ids.count(bos) == 1
    # the text path this issue is about: the rendered text starts with "<s>", and tokenizing it adds another
    assert tokenizer(tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False))["input_ids"][:2] == [bos, bos]


def test_reward_scores_see_the_chat_templates_ids_with_one_bos():
    tokenizer = bos_tokenizer()
    model = reward_model(tokenizer)
    text = "Write a review of The Lost River. It felt superb."
    scores = score_texts(model, tokenizer, [*CONVERSATIONS, text], batch_size=2)
    expected = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in CONVERSATIONS]
    expected.append(tokenizer(text + tokenizer.eos_token)["input_ids"])  # the RewardTrainer's plain text: + EOS
    assert model.seen == expected
    assert all(ids.count(tokenizer.bos_token_id) == 1 for ids in model.seen)
    with torch.no_grad():  # each one alone, unpadded: the batch's right padding changes nothing
        direct = torch.cat([model.model(input_ids=torch.tensor([ids])).logits[:, 0] for ids in expected])
    torch.testing.assert_close(scores, direct, rtol=1e-4, atol=1e-5)


def test_ptx_blocks_hold_one_bos_per_conversation():
    tokenizer = bos_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    messages = Dataset.from_list([{"messages": c} for c in CONVERSATIONS])
    prompt_completion = Dataset.from_list([{"prompt": c[:1], "completion": c[1:]} for c in CONVERSATIONS])
    for rows in (messages, prompt_completion):
        ptx = PtxBatches(rows, tokenizer, block_size=1, batch_size=1, seed=0, source="test")  # every id kept
        ids = ptx.blocks.flatten().tolist()
        assert ids == [i for c in CONVERSATIONS
                       for i in tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) + [eos]]
        assert ids.count(bos) == len(CONVERSATIONS)


@pytest.mark.parametrize("rows", ["conversations", "texts"])
def test_our_tokenizer_without_bos_gets_the_ids_the_text_path_gave(rows):
    """Our own tokenizer adds no BOS: the ids, and so the demo's figures, are what rendering to text gave."""
    tokenizer = own_tokenizer()
    eos = tokenizer.eos_token

    def old_ids(c):  # before issue 26: rendered to text, then tokenized with special tokens
        text = tokenizer.apply_chat_template(c, tokenize=False) if isinstance(c, list) else c
        return tokenizer(text if isinstance(c, list) or text.endswith(eos) else text + eos)["input_ids"]

    items = CONVERSATIONS if rows == "conversations" else [*TEXTS[:3], TEXTS[0] + eos]
    model = reward_model(tokenizer)
    score_texts(model, tokenizer, items)
    assert model.seen == [old_ids(c) for c in items]

    dataset = (Dataset.from_list([{"messages": c} for c in items]) if rows == "conversations"
               else Dataset.from_list([{"text": t} for t in items]))
    ptx = PtxBatches(dataset, tokenizer, block_size=1, batch_size=1, seed=0, source="test")
    old = [i for c in items for i in tokenizer(tokenizer.apply_chat_template(c, tokenize=False) if isinstance(c, list)
                                                 else c)["input_ids"] + [tokenizer.eos_token_id]]
    assert ptx.blocks.flatten().tolist() == old
