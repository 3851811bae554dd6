"""The grpo trainer: TRL's ``GRPOTrainer`` with ftcore's rollout producer in place of its own
generation and reward calls.

TRL keeps what it does well: the sampler (each prompt repeated ``num_generations`` times,
batches reused ``num_iterations`` times), padding, old/reference log-probs, advantages (GRPO and
GDPO aggregation, ``scale_rewards``, ``None`` rewards excluded), the clipped loss of every
``loss_type`` with its KL, clip-ratio and entropy metrics. ftcore adds: the ``Generator``
backends with weight sync every ``sync_interval`` steps and policy versions, stop strings, reward
workers with timeouts, truncation by finish reason, per-step rollout metrics, completions.jsonl,
a frozen-copy reference under full fine-tuning, resume at the right rollout, async prefetch
(``ftcore_grpo.prefetch``), importance-sampling correction against the generator's log-probs
(``ftcore_grpo.importance``: folded into per-token advantages, which TRL's losses accept) and the
skipping of micro-batches whose advantages are all zero, replay and re-roll (``ftcore_grpo.replay``),
and log-prob forwards that pack the micro-batch without padding (``ftcore_grpo.packed``).
The checkpoint state (``rollout_state``) comes back on ``--resume`` through ``run.stash["grpo"]``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from ftcore.train import remove_default_printer
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler, add_fused_lm_head, disable_dropout_in_model

from ftcore_grpo import importance, packed
from ftcore_grpo.config import importance_sampling
from ftcore_grpo.prefetch import AsyncRollouts, RolloutPlan
from ftcore_grpo.replay import Replay
from ftcore_grpo.rollout import Rollout, RolloutProducer

log = logging.getLogger("ftcore.grpo")

COMPLETIONS_FILE = "completions.jsonl"
TRL_TRUNCATION_METRICS = (
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
    "completions/min_terminated_length",
    "completions/max_terminated_length",
)
"""TRL's metrics that call a completion truncated when it does not end in EOS (wrong with stop
strings); ftcore logs ``completions/truncated_fraction`` from each completion's finish reason."""


class EpochRepeatSampler(RepeatSampler):
    """TRL's ``RepeatSampler`` whose epoch e is always the seeded generator's (e+1)-th permutation.

    TRL's draws a new permutation per iteration from a generator seeded once, so a run resumed in
    epoch e >= 1 (a fresh sampler) replayed epoch 0's order. Here ``set_epoch`` (which the trainer
    calls before each epoch) or else the count of iterations picks the permutation: the same order
    as TRL's sampler in an uninterrupted run, and after any resume.
    """

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed)
            for _ in range(self.epoch):  # the permutations of the epochs before this one
                torch.randperm(self.num_samples, generator=self.generator)
        self.epoch += 1
        return super().__iter__()


class FtcoreGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose rollouts come from a ``RolloutProducer``."""

    def __init__(self, *args, producer: RolloutProducer, ftcore_run, ref_model=None, **kwargs):
        trl_args = kwargs["args"]
        beta, trl_args.beta = trl_args.beta, 0.0  # no "ref" adapter copy, no reference reloaded from disk
        super().__init__(*args, **kwargs)
        self.beta = self.args.beta = beta
        if beta and ref_model is not None:
            self.ref_model = self._prepare_reference(ref_model)
        self.producer, self.ftcore_config = producer, ftcore_run.config
        self.grpo, self.output_dir = ftcore_run.config.grpo, Path(ftcore_run.output_dir)
        self._rollout: Rollout | None = None
        self.last_rollout: Rollout | None = None
        self._synced_step: int | None = None
        self._aligned = False
        self._eval_rollouts = 0
        self._next_completions_log = 0
        self.restored_state: dict | None = ftcore_run.stash.get("grpo", {}).get("checkpoint")
        self.prefetch = self._async_rollouts() if ftcore_run.config.grpo.async_prefetch else None
        self._skipped_in_step = 0
        grpo = self.grpo
        self.replay = Replay(grpo.replay_buffer_size, grpo.reroll_start_fraction, grpo.reroll_max_groups)
        if self.restored_state and "replay" in self.restored_state:
            self.replay.load_state_dict(self.restored_state["replay"])
        self._replayed: list[bool] = []
        self._policy_logps: torch.Tensor | None = None
        self._loss_inputs: dict | None = None
        remove_default_printer(self)

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        return EpochRepeatSampler(
            data_source=sampler.data_source, mini_repeat_count=sampler.mini_repeat_count,
            batch_size=sampler.batch_size, repeat_count=sampler.repeat_count, shuffle=sampler.shuffle, seed=sampler.seed,
        )  # fmt: skip

    def _send_telemetry(self):
        """ftcore reports nothing by default; TRL's usage ping stays off."""

    def create_model_card(self, *args, **kwargs):
        """No README.md in checkpoints/: the output_dir layout is ftcore's."""

    def _prepare_reference(self, ref_model):
        if self.args.disable_dropout:
            disable_dropout_in_model(ref_model)
        add_fused_lm_head(
            ref_model, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32
        )
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    @property
    def generate_every(self) -> int:
        """Micro-steps between two rollouts (one rollout feeds ``num_iterations`` optimizer steps)."""
        return self.args.steps_per_generation * self.num_iterations

    def rollout_index(self) -> int:
        return self._step // self.generate_every

    # -- the training loop's entry: rollouts at the right position, also after --resume

    def _prepare_inputs(self, generation_batch):
        if self.model.training and not self._aligned:
            self._align_with_resumed_step()
        return super()._prepare_inputs(generation_batch)

    def _align_with_resumed_step(self) -> None:
        """TRL counts micro-steps from 0 in every process; a resumed run continues the count."""
        self._aligned = True
        self._step = self.state.global_step * self.args.gradient_accumulation_steps
        every = self._completions_every()
        self._next_completions_log = -(-self.state.global_step // every) * every if every else 0
        if self.accelerator.is_main_process:
            _trim_rows(self.output_dir / COMPLETIONS_FILE, self.state.global_step)
        saved = self.restored_state
        if saved and (saved["rollout_index"], saved["sampler_seed"]) != (
            self.rollout_index(),
            self.args.seed,
        ):
            log.warning(
                "grpo: the checkpoint was at rollout %d (seed %d); this run continues at rollout %d (seed %d)",
                saved["rollout_index"], saved["sampler_seed"], self.rollout_index(), self.args.seed,
            )  # fmt: skip

    def evaluate(self, *args, **kwargs):
        self._eval_rollouts = 0  # every evaluation samples with the same seeds
        if self.prefetch is not None:  # the generator and the reward workers are the evaluation's now
            self.prefetch.cancel()
        return super().evaluate(*args, **kwargs)

    # -- rollouts: the producer generates and scores; TRL turns them into tensors and advantages

    def _generate_and_score_completions(self, inputs):
        training = self.model.training
        if training:
            self._sync_generator()
            rollout = self._take_rollout(inputs, self.rollout_index())
            self._replayed = []
            if self._whole_groups(rollout.rows) and self.replay.active:
                weights = self.reward_weights.tolist()
                rollout, self._replayed = self.replay.apply(rollout, weights, self.num_generations)
                self._metrics["train"]["replayed_groups"].append(sum(self._replayed) / self.num_generations)
        else:
            self._eval_rollouts += 1
            if self.prefetch is not None:  # one thread generates (a compiled decode step is per thread)
                rollout = self.prefetch.call(self.producer.produce, inputs, -self._eval_rollouts)
            else:
                rollout = self.producer.produce(inputs, -self._eval_rollouts)
        self._rollout = self.last_rollout = rollout
        try:
            output = super()._generate_and_score_completions(inputs)
            mode = "train" if training else "eval"
            self._after_rollout(self._rollout, output, mode)
            self._correct_importance(output, mode)
        finally:
            self._rollout = None
        return output

    def _whole_groups(self, rows) -> bool:
        """Whether this process holds whole groups (else replay and re-roll are left out)."""
        return len(rows) % self.num_generations == 0

    def _reroll(self, rows, index: int):
        """``rows`` with failed prompts of earlier batches in place of its last groups, when due."""
        if not self._whole_groups(rows):
            return rows
        accumulation = self.args.gradient_accumulation_steps
        step = index * self.generate_every // accumulation
        total_steps = max(1, self.state.max_steps or self.args.max_steps)
        self.replay.bound_rerolls(max(0, -(-total_steps * accumulation // self.generate_every) - index))
        queued = len(self.replay.rerolls)
        rows = self.replay.reroll(rows, step / total_steps, self.num_generations)
        if self.replay.reroll_start < 1.0:
            self._metrics["train"]["rerolled_groups"].append(float(queued - len(self.replay.rerolls)))
        return rows

    def _async_rollouts(self) -> AsyncRollouts:
        from accelerate.utils import broadcast_object_list

        plan = RolloutPlan(self.train_dataset, self._get_train_sampler(), self.args.generation_batch_size)
        return AsyncRollouts(
            self.producer,
            plan,
            depth=self.grpo.prefetch_depth,
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            broadcast=broadcast_object_list,
            prepare=self._reroll,
        )

    def _take_rollout(self, rows, index: int) -> Rollout:
        if self.prefetch is None:
            return self.producer.produce(self._reroll(rows, index), index)
        return self.prefetch.take(index, rows)

    def _sync_generator(self) -> None:
        """Hand the policy to the generator before the first rollout, then every ``sync_interval`` steps."""
        step = self.state.global_step
        interval = (
            self.grpo.sync_interval if self.grpo.generation == "vllm" or self.grpo.async_prefetch else 1
        )
        if self._synced_step is None or step - self._synced_step >= interval:
            self.producer.generator.sync_weights(self.accelerator.unwrap_model(self.model), step)
            self._synced_step = step

    def _tokenize_prompts(self, prompts):
        return [row["prompt_ids"] for row in self._rollout.rows], None, {}

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        completions = self._rollout.completions
        logprobs = [c.logprobs for c in completions]
        return [c.token_ids for c in completions], (None if any(lp is None for lp in logprobs) else logprobs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        from accelerate.utils import gather

        values = [[math.nan if v is None else v for v in sample] for sample in self._rollout.rewards]
        return gather(torch.tensor(values, dtype=torch.float32, device=self.accelerator.device))

    def _correct_importance(self, output: dict, mode: str) -> None:
        """Weight each token's advantage by the capped ratio p_trainer / p_generator (``[grpo]
        importance_sampling``), p_trainer being the log-probs before this batch's update. TRL has them
        when the batch trains over several steps; else they are those of the loss forward itself
        (the weights do not change within an optimizer step), so the weighting waits for it."""
        replayed = self._replayed if mode == "train" else []
        recompute = any(replayed) and self.grpo.replay_recompute_logps
        if "sampling_per_token_logps" not in output or (
            importance_sampling(self.grpo) == "off" and not recompute
        ):
            return
        output["replayed"] = torch.tensor(
            replayed or [False] * len(output["advantages"]), device=self.accelerator.device
        )
        if "old_per_token_logps" in output:
            self._apply_importance(output, output["old_per_token_logps"], mode)

    def _apply_importance(self, inputs: dict, trainer_logps: torch.Tensor, mode: str) -> None:
        generator_logps, replayed = inputs["sampling_per_token_logps"], inputs.pop("replayed")
        if self.grpo.replay_recompute_logps:  # replayed groups count as sampled by the current policy
            generator_logps[replayed] = trainer_logps[replayed].detach()
        level = importance_sampling(self.grpo)
        if level == "off":
            return
        correction = importance.importance_weights(
            trainer_logps.detach(),
            generator_logps,
            inputs["completion_mask"],
            level=level,
            mode=self.grpo.importance_sampling_mode,
            cap=self.grpo.importance_sampling_cap,
        )
        inputs["advantages"] = inputs["advantages"].unsqueeze(1) * correction.weights
        inputs["importance_weights"] = correction.weights
        for name, value in importance.metrics(correction).items():
            values = self.accelerator.gather(torch.tensor([value], device=self.accelerator.device))
            values = values[~values.isnan()]  # a process without completion tokens
            reduce = {"min": torch.min, "max": torch.max}.get(name.rsplit("/", 1)[-1], torch.mean)
            if values.numel():
                self._metrics[mode][name].append(reduce(values).item())

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **kwargs,
    ):  # fmt: skip
        """Log-probs and entropies of the completion tokens: from a packed forward (``[grpo]
        packed_forward``, ``ftcore_grpo.packed``) for text models without router or logit transforms,
        else TRL's padded forward."""
        unwrapped = self.accelerator.unwrap_model(model)
        text_only = not compute_aux_loss and all(v is None for v in kwargs.values())
        if self.grpo.packed_forward and text_only and packed.supported(unwrapped):
            with self.accelerator.autocast():
                logps, entropies = packed.logps_and_entropies(
                    model, unwrapped, input_ids, attention_mask, logits_to_keep, temperature=self.temperature,
                    batch_size=batch_size, compute_entropy=compute_entropy,
                )  # fmt: skip
            result = (logps, entropies, None)
        else:
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **kwargs,
            )  # fmt: skip
        self._policy_logps = result[0]  # the last call of a loss is its forward: for the corrected KL term
        if self._loss_inputs is not None and "replayed" in self._loss_inputs:  # TRL reads the advantages next
            self._apply_importance(self._loss_inputs, result[0], "train" if self.model.training else "eval")
        return result

    def _compute_loss(self, model, inputs):
        """TRL's loss, the importance weights applied once its forward has the log-probs; with
        ``importance_sampling_kl`` the KL term is added here instead, each token weighted by
        p_theta / p_old (TRL's correction) times the importance weight."""
        self._loss_inputs = inputs
        kl_corrected = bool(self.beta) and self.grpo.importance_sampling_kl
        beta, self.beta = self.beta, (0.0 if kl_corrected else self.beta)
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self.beta, self._loss_inputs = beta, None
        if not kl_corrected:
            return loss
        logps, mask = self._policy_logps, inputs["completion_mask"]
        gap = inputs["ref_per_token_logps"] - logps
        kl = torch.exp(gap) - gap - 1
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["kl"].append(
            self.accelerator.gather((kl * mask).sum() / mask.sum().clamp(min=1.0)).nanmean().item()
        )
        weighted = kl * torch.exp(logps - inputs.get("old_per_token_logps", logps.detach()))
        weighted = weighted * inputs.get("importance_weights", 1.0)
        return loss + beta * self._aggregate(weighted, mask, inputs, mode)

    def _aggregate(self, per_token, mask, inputs, mode: str):
        """``per_token`` reduced as TRL reduces its per-token loss for this ``loss_type``."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "grpo":
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return (per_token * mask).sum() / (per_token.size(0) * self.max_completion_length) / accumulation
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes  # dapo
        if mode == "train":
            normalizer = normalizer * accumulation / self.args.steps_per_generation
        return (per_token * mask).sum() / normalizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Micro-batches whose advantages are all zero skip forward and backward (with ``beta = 0``
        their loss and gradient are exactly zero); every process skips together."""
        if not (self.model.training and self.grpo.skip_zero_advantage_batches and not self.beta):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        device = self.accelerator.device
        skip = bool(
            self.accelerator.gather(torch.tensor([not inputs["advantages"].any()], device=device)).all()
        )
        self._skipped_in_step += skip
        if (self._step + 1) % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["skipped_zero_adv_batches"].append(float(self._skipped_in_step))
            self._skipped_in_step = 0
        if skip:
            return torch.zeros((), device=device, requires_grad=True)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _after_rollout(self, rollout: Rollout, output: dict, mode: str) -> None:
        device = self.accelerator.device
        truncated = torch.tensor([c.finish_reason == "length" for c in rollout.completions], device=device)
        if self.grpo.mask_truncated_completions:
            output["completion_mask"] = output["completion_mask"] * (~truncated).unsqueeze(1).int()
        masked = any(c.mask is not None for c in rollout.completions)  # context tokens inside completions
        if masked:
            width = output["completion_mask"].shape[1]
            masks = [(c.mask if c.mask is not None else [1] * len(c.token_ids)) for c in rollout.completions]
            padded = torch.tensor([m[:width] + [0] * (width - len(m[:width])) for m in masks], device=device)
            output["completion_mask"] = output["completion_mask"] * padded.int()
        if self.grpo.mask_truncated_completions or masked:
            output["num_items_in_batch"] = self.accelerator.gather(output["completion_mask"].sum()).sum()
        metrics = self._metrics[mode]
        for key in TRL_TRUNCATION_METRICS:
            metrics.pop(key, None)
        gather = self.accelerator.gather
        metrics["completions/truncated_fraction"].append(gather(truncated.float()).mean().item())
        for name, count in rollout.failures.items():
            metrics[f"rewards/{name}/failures"].append(
                gather(torch.tensor([float(count)], device=device)).sum().item()
            )
        lags = torch.tensor(
            [float(self.state.global_step - c.policy_version) for c in rollout.completions], device=device
        )
        lags = gather(lags)
        metrics["policy/version_lag_mean"].append(lags.mean().item())
        metrics["policy/version_lag_max"].append(lags.max().item())
        times = gather(
            torch.tensor([rollout.generation_seconds, rollout.scoring_seconds], device=device).view(1, 2)
        )
        metrics["timing/generation_seconds"].append(times[:, 0].max().item())
        metrics["timing/scoring_seconds"].append(times[:, 1].max().item())
        if mode == "train" and self.accelerator.is_main_process:
            self._log_completions(rollout, output["advantages"].tolist())

    # -- completions.jsonl

    def _completions_every(self) -> int:
        every = self.grpo.log_completions_steps
        return self.args.logging_steps if every is None else every

    def _log_completions(self, rollout: Rollout, advantages: list[float]) -> None:
        every, step = self._completions_every(), self.state.global_step
        if not every or step < self._next_completions_log:
            return
        self._next_completions_log = (step // every + 1) * every
        weights = self.reward_weights.tolist()
        names = [reward.name for reward in self.producer.scorer.rewards]
        lines = []
        for i in range(min(self.grpo.log_completions_count, len(rollout.completions))):
            completion, scores = rollout.completions[i], rollout.rewards[i]
            present = [w * v for w, v in zip(weights, scores, strict=True) if v is not None]
            record = {
                "step": step + 1,
                "rollout": rollout.index,
                "policy_version": completion.policy_version,
                "prompt": rollout.rows[i]["prompt"],
                "completion": completion.text,
                "finish_reason": completion.finish_reason,
                "tokens": len(completion.token_ids),
                "rewards": dict(zip(names, scores, strict=True)),
                "reward": sum(present) if present else None,
                "advantage": advantages[i],
            }
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / COMPLETIONS_FILE).open("a", encoding="utf-8") as handle:
            handle.writelines(lines)

    # -- checkpoint state (through the plugin's checkpoint_state hook)

    def rollout_state(self) -> dict:
        """The rollout position and sampler settings, stored in every checkpoint."""
        return {
            "global_step": self.state.global_step,
            "rollout_index": self.rollout_index(),
            "prompts_seen": self.rollout_index() * self.args.generation_batch_size // self.num_generations,
            "policy_version": self._synced_step,
            "sampler_seed": self.args.seed,
            "replay": self.replay.state_dict(),
        }

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.prefetch is not None:
                self.prefetch.close()
            self.producer.close()


def _trim_rows(path: Path, last_step: int) -> None:
    """Keep the rows of ``path`` up to ``last_step`` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines(True)
        if json.loads(line)["step"] <= last_step
    ]
    path.write_text("".join(kept), encoding="utf-8")
