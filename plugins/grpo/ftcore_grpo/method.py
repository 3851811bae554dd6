"""The ``grpo`` method: ftcore's model, prompts, rewards and generator around TRL's GRPO machinery."""

from __future__ import annotations

import copy
import os

from ftcore.train import one_gpu_per_process, training_arguments
from trl import GRPOConfig

from ftcore_grpo.data import prepare_prompts, template_kwargs
from ftcore_grpo.generation import SamplingParams, build_generator
from ftcore_grpo.hookspecs import add_to as add_hookspecs
from ftcore_grpo.rollout import RolloutProducer
from ftcore_grpo.scoring import Reward, RewardScorer, resolve_rewards
from ftcore_grpo.trainer import FtcoreGRPOTrainer


def grpo_arguments(config) -> dict:
    """``GRPOConfig`` keyword arguments of the ``[grpo]`` table."""
    grpo = config.grpo
    return dict(
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,  # the trainer's log-probs are of logits / temperature
        top_p=grpo.top_p,
        top_k=grpo.top_k,
        min_p=grpo.min_p or None,
        repetition_penalty=grpo.repetition_penalty,
        beta=grpo.beta,
        num_iterations=grpo.num_iterations,
        epsilon=grpo.epsilon,
        epsilon_high=grpo.epsilon_high,
        loss_type=grpo.loss_type,
        scale_rewards=grpo.scale_rewards,
        mask_truncated_completions=False,  # ftcore masks by finish reason (stop strings are not truncation)
        off_policy_mask_threshold=grpo.off_policy_mask_threshold,
        reward_weights=list(grpo.reward_weights) if grpo.reward_weights else None,
        multi_objective_aggregation=grpo.reward_aggregation,
        chat_template_kwargs=template_kwargs(config),
        log_completions=False,
        use_vllm=False,
    )


def sampling_params(config) -> SamplingParams:
    grpo = config.grpo
    return SamplingParams(
        temperature=grpo.temperature,
        top_p=grpo.top_p,
        top_k=grpo.top_k,
        min_p=grpo.min_p,
        repetition_penalty=grpo.repetition_penalty,
        max_tokens=grpo.max_completion_length,
        stop=list(grpo.stop),
    )


def reference_model(run):
    """A frozen copy of the policy as ftcore built it, for ``beta > 0`` under full fine-tuning; else None.

    Under an adapter the reference is the adapter-disabled base (no copy).
    """
    from peft import PeftModel

    if not run.config.grpo.beta or isinstance(run.model, PeftModel):
        return None
    return copy.deepcopy(run.model).requires_grad_(False).eval()


class GRPOMethod:
    """Group Relative Policy Optimization on ``prompt_only`` rows (the ``prompt`` format)."""

    row_schemas = ("prompt_only",)

    def build_trainer(self, run):
        config = run.config
        data = prepare_prompts(config, run.plugins, run.tokenizer)
        run.data_fingerprint = data.fingerprint
        rewards = self.rewards(run)
        args = one_gpu_per_process(
            GRPOConfig(
                **{
                    **training_arguments(config, run.output_dir, has_eval=data.eval is not None),
                    "include_num_input_tokens_seen": "no",  # TRL counts prompt and completion tokens itself
                    # a baseline: the held-out rewards before training, beside those every eval_steps
                    "eval_on_start": data.eval is not None and bool(config.train.eval_steps),
                },
                **grpo_arguments(config),
            )
        )
        ref_model = reference_model(run)
        generator = build_generator(config, run.model, run.tokenizer, run.output_dir, device=args.device)
        scorer = RewardScorer(rewards, workers=config.grpo.reward_workers, timeout=config.grpo.reward_timeout)
        producer = self.producer(run, generator, scorer, sampling_params(config))
        return FtcoreGRPOTrainer(
            model=run.model,
            reward_funcs=rewards,  # TRL reads their names; ftcore's producer calls them
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=run.tokenizer,
            callbacks=run.callbacks,
            producer=producer,
            ftcore_run=run,
            ref_model=ref_model,
        )

    def rewards(self, run) -> list[Reward]:
        """The run's reward functions: ``[grpo] rewards`` (a subclass adds its own reward source here)."""
        return resolve_rewards(run.config, run.plugins)

    def producer(self, run, generator, scorer, sampling) -> RolloutProducer:
        """The run's rollout producer: the first plugin's ``grpo_rollout_producer`` (see
        ``ftcore_grpo.hookspecs``), else grpo's own."""
        add_hookspecs(run.plugins)
        supplied = run.plugins.hook.grpo_rollout_producer(
            run=run, generator=generator, scorer=scorer, sampling=sampling
        )
        if supplied is not None:
            return supplied
        rank = int(os.environ.get("RANK", "0"))
        return RolloutProducer(
            generator,
            scorer,
            sampling,
            seed=run.config.train.seed,
            rank=rank,
            streaming_groups=run.config.grpo.streaming_groups,
        )

    def preview(self, config, plugins, tokenizer, n: int, *, color: bool = False) -> list[str]:
        """What ``ftcore preprocess --show N`` prints: N templated prompts, then a summary."""
        return preview_lines(tokenizer, prepare_prompts(config, plugins, tokenizer), n, color=color)


def preview_lines(tokenizer, data, n: int, *, color: bool = False) -> list[str]:
    """The first ``n`` prompts as the policy sees them (tokenized, templated) with their reward columns."""
    from ftcore.data.preview import IGNORE, render_row

    lines = []
    for index in range(min(n, len(data.train))):
        row = data.train[index]
        ids = row["prompt_ids"]
        columns = {k: v for k, v in row.items() if k not in ("prompt", "prompt_ids")}
        lines += [
            f"=== prompt {index} ({len(ids)} tokens) ===",
            render_row(tokenizer, {"input_ids": ids, "labels": [IGNORE] * len(ids)}, color=color),
            f"columns: {columns}",
            "",
        ]
    evaluation = len(data.eval) if data.eval is not None else 0
    lines += [
        f"data fingerprint {data.fingerprint}",
        f"prompts          {len(data.train):,} (eval {evaluation:,}); {data.dropped:,} dropped as too long",
    ]
    return lines
