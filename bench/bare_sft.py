"""The bare-TRL baseline for SFT: what a TRL user writes, and nothing more.

Load the tokenizer and the model, load the data, SFTTrainer(model, args, train_dataset, processing_class),
train, save. bench/run.py gives it the same model, the same data file and the same SFTConfig fields as the
pipeline's stage.
"""

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer


def main(model_path: str, data_file: str, config: dict) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    dataset = load_dataset("json", data_files=data_file, split="train")
    args = SFTConfig(**config)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)
