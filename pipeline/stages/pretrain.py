"""Stage 0, pretrain: a byte-level BPE tokenizer and a GPT-2 trained from scratch on a text corpus.

The causal LM objective on plain text through the SFT stage's trainer (TRL's SFTTrainer, with its bfd packing
laid out so that each packed document attends only to itself). This is how the embedded default gets a
base model offline; with a Hub model (openai-community/gpt2) the pipeline starts at SFT instead.
"""

import math
import os

from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
from trl import get_peft_config

from .. import hub
from ..data import parse_transcript
from ..models import fit_to_tokenizer, train_tokenizer
from .common import finish, last_checkpoint, load_data, mark_output_dir, setup, train
from .sft import SFTStageTrainer


# GPT-2's tanh GELU as PyTorch's fused kernel: the same function as GPT2Config's default "gelu_new" (to 2.4e-7),
# which is seven elementwise ops each way; on the CPU a tiny reward-model step takes about 12% less with it
ACTIVATION = "gelu_pytorch_tanh"


def in_chat_format(text: str, tokenizer) -> str:
    """A "\n\nHuman: ...\n\nAssistant: ..." transcript rendered by the tokenizer's chat template; other text as is."""
    if not text.startswith("\n\nHuman:"):
        return text
    return tokenizer.apply_chat_template(parse_transcript(text), tokenize=False)


def main(script_args, training_args, model_args):
    setup(training_args, "pretrain")
    publication = hub.prepare("pretrain", script_args, training_args, model_args)  # before the trainer
    checkpoint = last_checkpoint(training_args)

    train_dataset, eval_dataset, source = load_data("text", script_args)

    if checkpoint:  # the tokenizer saved with the checkpoint is the one the weights were trained with
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    else:
        tokenizer = train_tokenizer(train_dataset["text"], script_args.vocab_size, script_args.chat_format)
    if script_args.chat_format != "hh":  # Human/Assistant transcripts of the corpus, in the tokenizer's chat format
        train_dataset, eval_dataset = (None if split is None else split.map(
            lambda row: {"text": in_chat_format(row["text"], tokenizer)}) for split in (train_dataset, eval_dataset))

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=script_args.n_positions,
        n_embd=script_args.n_embd,
        n_layer=script_args.n_layer,
        n_head=script_args.n_head,
        resid_pdrop=script_args.dropout,
        embd_pdrop=script_args.dropout,
        attn_pdrop=script_args.dropout,
        activation_function=ACTIVATION,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = fit_to_tokenizer(GPT2LMHeadModel(config), tokenizer)
    peft_config = get_peft_config(model_args)
    if peft_config is not None:  # LoRA on a new model: its random weights are the adapter's base, kept in base/
        base = os.path.join(training_args.output_dir, "base")
        mark_output_dir(training_args, "pretrain")  # base/ is the stage's, even if training never starts
        with training_args.main_process_first(desc="LoRA base model"):
            if not os.path.isfile(os.path.join(base, "config.json")):
                model.save_pretrained(base)
                tokenizer.save_pretrained(base)
            model = GPT2LMHeadModel.from_pretrained(base)  # the adapter then names base/ as its base model

    trainer = SFTStageTrainer(  # TRL's SFTTrainer; with bfd packing, each packed document masked from the others
        source=source,
        lm_head=script_args.lm_head,
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    train_result = train(trainer, checkpoint, "pretrain")

    metrics = {"train_loss": train_result.training_loss, "parameters": model.num_parameters()}
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
        metrics["eval_perplexity"] = math.exp(metrics["eval_loss"])
    trainer.log_metrics("final", metrics)
    finish(trainer, training_args, source, metrics, tags=["pipeline", "pretrain"], publication=publication)
