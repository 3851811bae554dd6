"""The default training loss: the output layer and cross-entropy over chunks of tokens.

A causal LM's own loss (transformers' ``ForCausalLMLoss``) holds the logits of every token of the
micro-batch, upcast to float32, for the backward pass: for 8,192 tokens and a 128k vocabulary that
is more than 10 GB of logits, their softmax and their gradient. While the trainer computes a
training loss, ``ChunkedLoss.applied`` swaps two things on the model instance, then runs the model's
own forward with its labels: the output layer returns the logits of two positions only (keeping its
input, the final hidden states), and the model's ``loss_function`` computes the same cross-entropy
from those hidden states chunk by chunk. Each chunk runs under ``torch.utils.checkpoint``: its
logits exist only while it is computed, forward and again in backward. The loss stays the model's
output (wrappers such as FSDP hook into it; MoE models add their router loss to it as usual).

Any output layer works (LoRA, modules_to_save, quantized): the chunks call its own forward. The
price is one more output-layer forward per step. ``cce`` and ``liger`` replace this with fused
kernels through the ``compute_loss`` hook or a patched forward; a model whose forward is not
transformers' own (a plugin's), whose loss is not the causal-LM cross-entropy, or whose logits are
scaled after the output layer keeps its own loss. Final-logit softcapping (Gemma) is reproduced.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from functools import cache
from typing import Any

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**26
"""Logits elements in one chunk (256 MiB in float32): 523 tokens of a 128k vocabulary."""
PROBE_POSITIONS = 2


class LogitsChanged(Exception):
    """The model changed its logits after the output layer in a way the chunks do not reproduce."""


class ChunkedLoss:
    """The chunked default loss for one trainer's model; checks once whether the model allows it."""

    def __init__(self, chunk_elements: int | None = None):
        self.chunk_elements = chunk_elements or CHUNK_ELEMENTS
        self.reason: str | None = None
        self.checked = self.verified = False

    def supported(self, model) -> bool:
        if not self.checked:
            self.reason, self.checked = unsupported_reason(model), True
        return self.reason is None

    @contextmanager
    def applied(self, model):
        """Inside the block, ``model``'s forward computes its training loss chunk by chunk (where supported)."""
        if not (model.training and self.supported(model)):
            yield
            return
        base = base_model(model)
        head = base.get_output_embeddings()
        captured: list[tuple[Any, Any, Any]] = []
        swaps = ((head, "forward"), (base, "_loss_function"))
        softcap = getattr(text_config(base), "final_logit_softcapping", None)

        def output_layer(hidden, *args, **kwargs):
            import torch

            def forward(x):
                return original(x, *args, **kwargs)

            with torch.no_grad():
                probe = forward(hidden[..., :PROBE_POSITIONS, :])
            captured.append((hidden, forward, probe))
            return probe

        def loss_function(
            logits,
            labels=None,
            vocab_size=None,
            num_items_in_batch=None,
            ignore_index=IGNORE_INDEX,
            shift_labels=None,
            **kwargs,
        ):
            import torch

            if len(captured) != 1:
                raise LogitsChanged(f"the output layer ran {len(captured)} times in one forward")
            hidden, forward, probe = captured.pop()
            if not self.verified:
                if not torch.allclose(logits.float(), capped(probe, softcap).float(), rtol=1e-3, atol=1e-3):
                    raise LogitsChanged("its logits change after the output layer")
                self.verified = True
            if shift_labels is None:
                shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
            chunk_tokens = max(1, self.chunk_elements // probe.shape[-1])
            total = linear_cross_entropy_sum(
                forward, hidden, shift_labels, chunk_tokens, softcap=softcap, ignore_index=ignore_index
            )
            if num_items_in_batch is None:
                return total / shift_labels.ne(ignore_index).sum().to(total.device)
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(total.device)
            return total / num_items_in_batch

        original = head.forward
        saved = {name: vars(owner)[name] for owner, name in swaps if name in vars(owner)}
        head.forward, base.loss_function = output_layer, loss_function
        try:
            yield
        except LogitsChanged as error:
            self.reason = str(error)
            print(f"ftcore: the default loss runs unchunked for {type(base).__name__}: {error}")
            raise
        finally:
            for owner, name in swaps:
                if name in saved:
                    setattr(owner, name, saved[name])
                else:
                    delattr(owner, name)


def capped(logits, softcap: float | None):
    """``logits`` after final-logit softcapping, computed as transformers' models do."""
    import torch

    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _chunk_loss(forward, hidden, targets, softcap, ignore_index):
    import torch

    logits = capped(forward(hidden), softcap)
    return torch.nn.functional.cross_entropy(
        logits.float(), targets, ignore_index=ignore_index, reduction="sum"
    )


def linear_cross_entropy_sum(
    forward, hidden, targets, chunk_tokens: int, *, softcap=None, ignore_index=IGNORE_INDEX
):
    """Summed cross-entropy of ``forward(hidden)`` (logits) against ``targets``, ``chunk_tokens`` at a time.

    ``hidden`` is (..., hidden_size) and ``targets`` the matching (...) class ids; the logits are
    upcast to float32 as transformers does. Each chunk's logits are recomputed in backward.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    parts = [
        checkpoint(
            _chunk_loss, forward, hidden_part, target_part, softcap, ignore_index,
            use_reentrant=False, preserve_rng_state=False,  # a linear layer and a cross-entropy: no randomness
        )
        for hidden_part, target_part in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens), strict=True)
    ]  # fmt: skip
    return torch.stack(parts).sum() if len(parts) > 1 else parts[0]


def base_model(model):
    """The transformers model inside DDP/FSDP/compile and peft wrappers."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@cache
def _calls_loss_function(forward) -> bool:
    try:
        return "self.loss_function(" in inspect.getsource(forward)
    except (OSError, TypeError):
        return False


def _instance_forward(model):
    """The forward set on the instance in place of its class's (a plugin's), or None. Accelerate's
    mixed-precision wrapper (autocast around the class's forward, kept as ``_original_forward``)
    does not count."""
    forward = vars(model).get("forward")
    original = vars(model).get("_original_forward")
    if forward is not None and getattr(original, "__func__", None) is type(model).forward:
        return None
    return forward


def unsupported_reason(model) -> str | None:
    """Why ``model``'s training loss cannot be chunked here, or None when it can."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    base = base_model(model)
    forward = getattr(type(base), "forward", None)
    if _instance_forward(base) is not None or not (getattr(forward, "__module__", "") or "").startswith(
        "transformers.models."
    ):
        return "its forward is not transformers' own (a plugin's fused loss, or remote code)"
    if getattr(base, "loss_function", None) is not ForCausalLMLoss or not _calls_loss_function(forward):
        return "its loss is not transformers' causal-LM cross-entropy"
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        return "it has no output layer"
    config = text_config(base)
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in ("logit_scale", "logits_scaling")):
        return "it scales its logits after the output layer"
    return None
