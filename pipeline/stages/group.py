"""Stage 3 without a value model, GRPO and RLOO: TRL's `GRPOTrainer` and `RLOOTrainer` sample several answers per
prompt (`num_generations`) and take each answer's advantage against the others of its group. They start from the
SFT policy (`model_name_or_path`) and are rewarded by the learned reward model (`reward_model_path`, a TRL
`reward_funcs` entry) and/or Python reward functions, in the same `module:function` syntax as PPO's, weighted by
`reward_model_weight` and `reward_function_weights`. Then the policy is evaluated against the SFT policy exactly as
PPO's is (pipeline.stages.policy_eval)."""

import copy
import logging
import typing

import torch
from trl import get_peft_config

from .. import hub, lm_head, padding_free, rl, rollout, sampler
from ..models import (CAUSAL_LM, SCALAR_HEAD, check_before_loading, check_model_kind, load_causal_lm,
                      load_reward_model, load_tokenizer)
from .common import check_template_roles, finish, last_checkpoint, load_data, setup, train
from .online import alarms_for, evaluation_prompts, require_reward, tokenize_prompts
from .policy_eval import (MonitorInCheckpoints, check_curve_settings, evaluate_against_sft, for_evaluation, log_final,
                          monitor_for)

logger = logging.getLogger("pipeline")


def monitored(trainer_class):
    """TRL's GRPOTrainer or RLOOTrainer, with the reward-hacking alarms (pipeline.monitor) fed every batch of answers
    it scores: their lengths and, where it trains against one, the reward model's scores (TRL's first reward
    function); their state goes into every checkpoint."""

    class Monitored(MonitorInCheckpoints, trainer_class):
        rm_column = None  # the reward model's column of TRL's rewards_per_func
        layout = "padded"  # pipeline.padding_free's layout of the log-probability passes (main_for chooses)
        lockstep = False  # one block per chunk of rows: several processes (main_for)
        sampled = None  # the answers the sampler last drew, with their log-probabilities (`sampled_log_probs`)

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            if self.monitor is not None and self.model.training:
                lengths = torch.tensor([float(len(ids)) for ids in completion_ids_list], device=rewards.device)
                figures = self.monitor.alarms.observe(
                    self.state.global_step + 1, self.accelerator.gather(lengths),
                    None if self.rm_column is None else rewards[:, self.rm_column])
                for key, value in figures.items():
                    self._metrics["train"][key].append(value)
            return rewards

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                               compute_entropy=False, compute_aux_loss=False, **inputs):
            """TRL's, on the `padding_free` layout (pipeline.padding_free.fused_log_probs): each token at its own
            position, only real tokens computed where the layout packs. Multimodal inputs and MoE models' auxiliary
            loss (which counts every token of a row) go to TRL's own."""
            sampled, self.sampled = self.sampled, None  # for the first pass after generation alone
            if compute_aux_loss or any(value is not None for value in inputs.values()):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                    **inputs)
            if (sampled is not None and not compute_entropy and not torch.is_grad_enabled() and model is self.model
                    and self.accelerator.mixed_precision == "no"):
                old = sampled_log_probs(model, sampled, input_ids, attention_mask, logits_to_keep)
                if old is not None:
                    return old, None, None
            batch_size = batch_size or len(input_ids)
            logps, entropies = [], []
            for start in range(0, len(input_ids), batch_size):
                rows, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size].bool()
                with self.accelerator.autocast():
                    chunk = padding_free.fused_log_probs(model, rows, mask, logits_to_keep, self.layout,
                                                         compute_entropy, one_block=self.lockstep)
                logps.append(chunk[0])
                entropies.append(chunk[1])
            return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
            """TRL's, with its `generate` call drawn by pipeline.sampler where that can run the policy and the
            generation config asks for plain sampling at a temperature (TRL's defaults: top_p 1, top_k 0, no
            repetition penalty): the same distribution, less work per token (pipeline.rollout.generate). Any other
            setting, inputs beside the token ids (images), vLLM and transformers' continuous batching (which do
            not call `generate`) go through TRL's own path unchanged."""
            policy = self.accelerator.unwrap_model(self.model_wrapped)
            transformers_generate = policy.generate
            pad_token_id = getattr(self.processing_class, "pad_token_id", None)
            if pad_token_id is None:  # a processor: its tokenizer's
                pad_token_id = self.processing_class.tokenizer.pad_token_id

            def generate(input_ids=None, attention_mask=None, generation_config=None, **other):
                if (other or generation_config is None or not rollout.plain_sampling(generation_config)
                        or sampler.supported(policy) is not None
                        or not torch.equal(attention_mask.bool(), rollout.query_mask(input_ids, pad_token_id))):
                    return transformers_generate(input_ids=input_ids, attention_mask=attention_mask,
                                                 generation_config=generation_config, **other)
                rows, logprobs = rollout.generate(policy, input_ids, pad_token_id, generation_config, len(input_ids),
                                                  return_logprobs=True)
                self.sampled = Sampled(rows[:, input_ids.shape[1]:], logprobs, adapter_state(policy))
                return rows

            policy.generate = generate  # for this call only
            try:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
            finally:
                del policy.generate

    Monitored.__name__ = Monitored.__qualname__ = trainer_class.__name__
    return Monitored


class Sampled(typing.NamedTuple):
    answers: torch.Tensor  # (rows, steps): each answer, padded after the stop token that ended it
    log_probs: torch.Tensor  # (rows, steps): each drawn token's log-probability under the temperature, 0 on padding
    adapters: tuple  # the policy's PEFT adapters as they were (`adapter_state`)


def adapter_state(model) -> tuple:
    """Which PEFT adapters shape the policy's outputs: the active ones, and whether they are switched off (TRL's
    reference for a LoRA policy is the policy with its adapters off); () for a model without adapters."""
    if not hasattr(model, "peft_config"):
        return ()
    from peft.tuners.tuners_utils import BaseTunerLayer

    off = any(layer.disable_adapters for layer in model.modules() if isinstance(layer, BaseTunerLayer))
    return (str(model.active_adapter), off)


def drops_out(model) -> bool:
    """Whether a forward pass of `model` would drop activations at random (in training mode, a dropout rate above 0
    in a module or in the attention's config), so that two passes give different log-probabilities."""
    if not model.training:
        return False
    config = getattr(model, "config", None)  # rates models apply functionally (Llama's attention, OPT's layers)
    rates = [getattr(config, name, 0.0) or 0.0 for name in ("attention_dropout", "dropout")]
    return any(rate > 0 for rate in rates) or any(
        isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0 for module in model.modules())


def sampled_log_probs(model, sampled: Sampled, input_ids, attention_mask, logits_to_keep: int):
    """The old policy's per-token log-probabilities of TRL's rows (GRPO's when its policy may have moved on before
    a later pass over them, RLOO's always), read from what the sampler returned with the answers it drew: the same
    weights and temperature, so the same values as the forward pass TRL makes for them right after generation (up
    to float rounding: the sampler's keys and values were computed token by token). None (TRL's pass runs) unless
    the rows' answers are exactly the ones drawn, in order, the policy's adapters are as they were (not the
    reference's, adapters off), no dropout makes a pass differ from another, and the weights are float32 (the
    caller: no autocast). In bfloat16 a pass rounds differently from the token-by-token sampler, by about 1e-2;
    TRL makes this pass so that the first update's probability ratios start at 1 exactly, so it stays there."""
    answers, log_probs, adapters = sampled
    mask = attention_mask[:, -logits_to_keep:].bool()
    steps = min(answers.shape[1], logits_to_keep)
    if (len(answers) != len(input_ids) or mask[:, steps:].any() or adapter_state(model) != adapters
            or drops_out(model) or any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point())):
        return None
    mask = mask[:, :steps]
    if not torch.equal(input_ids[:, -logits_to_keep:][:, :steps][mask], answers[:, :steps].to(input_ids.device)[mask]):
        return None
    old = log_probs.new_zeros(mask.shape[0], logits_to_keep, device=input_ids.device)
    old[:, :steps] = log_probs[:, :steps].to(old.device).masked_fill(~mask, 0.0)
    return old


def left_truncating(tokenizer, max_length: int):
    """A copy of `tokenizer` whose calls cut each text to its last `max_length` tokens. TRL's GRPO and RLOO score an
    answer by decoding it and tokenizing prompt and answer again through the reward model's chat template, without
    truncation: the end-of-turn tokens (or a different split of the decoded text) can take a prompt of
    max_prompt_length and an answer of max_completion_length past the reward model's positions, which crashes it.
    Cut from the left, the reward model still reads the whole answer and its last token."""

    class LeftTruncating(type(tokenizer)):
        def __call__(self, *args, **kwargs):
            kwargs.setdefault("truncation", True)
            kwargs.setdefault("max_length", max_length)
            return super().__call__(*args, **kwargs)

    truncating = copy.deepcopy(tokenizer)
    truncating.__class__ = LeftTruncating
    truncating.truncation_side = "left"
    return truncating


def main_for(stage: str, trainer_class, script_args, training_args, model_args):
    require_reward(stage, script_args, script_args.reward_model_path)
    check_curve_settings(script_args)
    check_model_kind(model_args.model_name_or_path, CAUSAL_LM, "model_name_or_path", model_args)
    if script_args.reward_model_path:
        check_model_kind(script_args.reward_model_path, SCALAR_HEAD, "reward_model_path", model_args)
    check_before_loading(stage, script_args, training_args, model_args)
    setup(training_args, stage)
    functions = rl.load_reward_functions(script_args.reward_functions, script_args.reward_function_weights)
    trains_on_model = bool(script_args.reward_model_path) and script_args.reward_model_weight != 0
    # TRL's reward_weights, one per reward_funcs entry, the reward model's first; set before the recipe is saved
    # (a saved recipe.yaml, which has them, reruns as it is)
    weights = ([script_args.reward_model_weight] if trains_on_model else []) + [w for _, _, w in functions]
    if training_args.reward_weights is not None and list(training_args.reward_weights) != weights:
        raise ValueError(f"{stage}: set reward_model_weight and reward_function_weights, not reward_weights "
                         "(the pipeline builds TRL's reward_weights from them)")
    training_args.reward_weights = weights
    publication = hub.prepare(stage, script_args, training_args, model_args)  # before the trainer
    peft_config = get_peft_config(model_args)

    prompts, eval_prompts, source = load_data("prompt", script_args)
    policy_path = model_args.model_name_or_path
    tokenizer = load_tokenizer(policy_path, model_args, padding_side="left")
    check_template_roles(tokenizer, policy_path, source, (prompts, script_args.dataset_train_split),
                         (eval_prompts, script_args.dataset_test_split))
    rl.trial_call(functions, tokenizer, prompts)
    reward_model, reward_tokenizer = (load_reward_model(script_args.reward_model_path, tokenizer, model_args)
                                      if script_args.reward_model_path else (None, None))
    policy = load_causal_lm(policy_path, tokenizer, model_args)

    reward_funcs = ([reward_model] if trains_on_model else []) + [
        rl.for_trl(name, function, tokenizer) for name, function, _ in functions]
    positions = getattr(reward_model.config, "max_position_embeddings", None) if trains_on_model else None
    if positions and script_args.max_prompt_length + training_args.max_completion_length >= positions:
        logger.info(f"{stage}: max_prompt_length + max_completion_length fill the reward model's {positions} "
                    "positions; where the chat template's tokens take a prompt and answer past them, the prompt's "
                    "start is cut when they are scored")
    processing = ([left_truncating(reward_tokenizer, positions) if positions else reward_tokenizer]
                  if trains_on_model else []) + [None] * len(functions)

    trainer = monitored(trainer_class)(
        model=policy,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=tokenize_prompts(prompts, tokenizer, script_args.max_prompt_length, source, keep_prompts=True),
        processing_class=tokenizer,
        reward_processing_classes=processing,
        peft_config=peft_config,
    )
    trainer.layout = padding_free.choose_layout(script_args.padding_free, [policy])  # the reference: the same kind
    # several processes: one block per chunk of rows, as many forward calls as TRL makes. Under DDP each call of the
    # wrapped policy broadcasts its buffers and prepares the gradient reduction; sharded weights are gathered per call
    trainer.lockstep = trainer.accelerator.num_processes > 1
    logger.info(f"{stage}: log-probabilities on the {trainer.layout} layout (padding_free: {script_args.padding_free})")
    if script_args.lm_head == "auto":  # on the CPU, small logits are cheaper whole than in TRL's tiles
        logger.info(f"{stage}: lm_head: auto: %s", lm_head.describe(lm_head.materialise_models(
            [trainer.model, trainer.ref_model], temperature=training_args.temperature, labelled_only=True)))
    held_out = evaluation_prompts(prompts, eval_prompts, tokenizer, script_args.max_prompt_length, source)
    # the reward model as the trainer holds it (on its device, prepared for DeepSpeed), or, if it was not trained
    # against, made ready the same way
    scorer = trainer.reward_funcs[0] if trains_on_model else for_evaluation(reward_model, trainer)
    checkpoint = last_checkpoint(training_args)
    trainer.rm_column = 0 if trains_on_model else None
    reference = trainer.ref_model if trainer.ref_model is not None or not script_args.curve_steps else for_evaluation(
        load_causal_lm(policy_path, tokenizer, model_args), trainer)  # the curve's KL needs the SFT policy
    trainer.monitor = monitor_for(trainer, script_args, tokenizer, held_out, scorer, reference,
                                  training_args.max_completion_length, training_args.temperature,
                                  alarms=alarms_for(script_args), checkpoint=checkpoint)
    train(trainer, checkpoint, stage)

    metrics = evaluate_against_sft(
        trainer, stage, script_args, model_args, tokenizer, held_out,
        sft_model_path=policy_path, reward_model=scorer, max_new_tokens=training_args.max_completion_length,
        temperature=training_args.temperature, reference=reference)
    metrics["eval_held_out"] = eval_prompts is not None
    metrics.update(trainer.monitor.results())
    log_final(trainer, metrics)
    finish(trainer, training_args, source, metrics, tags=["pipeline", stage, "rlhf"], publication=publication)
