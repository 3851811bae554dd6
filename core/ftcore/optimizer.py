"""``train.optimizer = "adamw_compiled"``: AdamW as one ``torch.compile``'d step over all parameters.

torch's fused AdamW (``adamw_torch_fused``) reads and writes the parameters, gradients and both
moments in chunks of a fixed size; on an H200 it moved 2.65 TB/s for Llama-3.2-1B's parameters in
bf16 (6.5 ms a step), where torch's AdamW compiled by inductor moved 3.8 TB/s (4.6 ms). Compiled, the
torch AdamW takes no ``grad_scale`` / ``found_inf`` though, which ftcore's folded clipping and
divergence check hand to the step (``ftcore.train``, ``ftcore.checkpoint``). This optimizer has the
update of ``torch.optim.AdamW`` (decoupled weight decay, bias corrections, the same state layout)
and those two arguments, as the fused one has them: gradients are divided by ``grad_scale``, and a
step whose ``found_inf`` is non-zero leaves weights, moments and step counts as they were, all on
the device. The arithmetic is float32 whatever the parameters' dtype, as in the fused kernel.
"""

from __future__ import annotations

import torch


def _adamw_update(
    params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, grad_scale, skip
):
    for param, grad, exp_avg, exp_avg_sq, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, steps, strict=True
    ):
        grad = grad.float() / grad_scale
        new_step = step + 1
        new_exp_avg = torch.lerp(exp_avg.float(), grad, 1 - beta1)
        new_exp_avg_sq = exp_avg_sq.float() * beta2 + (1 - beta2) * grad * grad
        denominator = new_exp_avg_sq.sqrt() / (1 - beta2**new_step).sqrt() + eps
        new_param = (
            param.float() * (1 - lr * weight_decay) - (lr / (1 - beta1**new_step)) * new_exp_avg / denominator
        )
        param.copy_(torch.where(skip, param.float(), new_param))
        exp_avg.copy_(torch.where(skip, exp_avg.float(), new_exp_avg))
        exp_avg_sq.copy_(torch.where(skip, exp_avg_sq.float(), new_exp_avg_sq))
        step.copy_(torch.where(skip, step, new_step))


_compiled_update = None


class CompiledAdamW(torch.optim.Optimizer):
    """AdamW whose step is one compiled graph over every parameter with a gradient (see the module).

    Set ``grad_scale`` (gradients are divided by it) or ``found_inf`` (non-zero: skip this step) as
    attributes before ``step()``, as for torch's fused optimizers; the learning rate may change
    every step (it reaches the compiled step as a tensor, so nothing recompiles).
    """

    _step_supports_amp_scaling = True
    fused_step = True
    """Takes ``grad_scale`` and ``found_inf`` as torch's fused optimizers do (``ftcore.checkpoint.fused_optimizer``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        # capturable: the step counts live beside the parameters, as load_state_dict puts them back
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, capturable=True)
        super().__init__(params, defaults)
        self._scalars: dict = {}
        """Per device: the learning rate, the default grad_scale (1) and found_inf (0) as tensors."""

    @torch.no_grad()
    def step(self, closure=None):
        global _compiled_update
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if _compiled_update is None:
            _compiled_update = torch.compile(_adamw_update, dynamic=False)
        # absent, or None (fp16's gradient scaler, once it has unscaled the gradients itself)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            lr, one, zero = self._device_scalars(params[0].device)
            lr.fill_(group["lr"])
            _compiled_update(
                params, [p.grad for p in params], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [s["step"] for s in states], lr, *group["betas"],
                group["eps"], group["weight_decay"], one if grad_scale is None else grad_scale.to(lr.device),
                (zero if found_inf is None else found_inf.to(lr.device)) > 0,
            )  # fmt: skip
        return loss

    def _device_scalars(self, device):
        if device not in self._scalars:
            self._scalars[device] = tuple(torch.full((), value, device=device) for value in (0.0, 1.0, 0.0))
        return self._scalars[device]

    def _state(self, param) -> dict:
        state = self.state[param]
        if not state:  # torch.optim.AdamW's layout (capturable: the step count on the device)
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state
