"""The bare-TRL baseline for PPO, as in TRL's own PPO example: load the policy, the reference, the reward
and the value models, tokenize the prompts with the chat template, PPOTrainer(...), train, save. Same
models, prompt file and PPOConfig fields as the pipeline's stage."""

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.experimental.ppo import PPOConfig, PPOTrainer


def main(policy_path: str, reward_path: str, data_file: str, config: dict) -> None:
    tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(policy_path)
    ref_policy = AutoModelForCausalLM.from_pretrained(policy_path)
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1)

    dataset = load_dataset("json", data_files=data_file, split="train")

    def tokenize(row):
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        return {"input_ids": ids}

    dataset = dataset.map(tokenize, remove_columns=dataset.column_names)
    args = PPOConfig(**config)
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, value_model=value_model, train_dataset=dataset,
                         eval_dataset=dataset)
    trainer.train()
    trainer.save_model(args.output_dir)
