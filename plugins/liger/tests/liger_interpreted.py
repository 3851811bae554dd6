"""Liger's rope and fused linear cross-entropy kernels on the CPU, under Triton's interpreter.

Run as a script with ``TRITON_INTERPRET=1`` set before anything imports Triton (the test does
this in a subprocess). liger-kernel's RMSNorm and SwiGLU kernels do not run under the interpreter,
so they stay off here and are checked on the GPU. Prints one JSON line per case.
"""

import copy
import json

import peft
import torch
from accelerate import Accelerator
from ftcore.config import validate_config
from ftcore.testing import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

IGNORE_INDEX = -100


def packed_batch(vocab_size: int):
    """Two rows, the first holding two packed sequences (positions restart, boundary ignored)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (2, 16), generator=generator)
    position_ids = torch.cat([torch.arange(9), torch.arange(7)]).repeat(2, 1)
    position_ids[1] = torch.arange(16)
    labels = input_ids.clone()
    labels[0, 9] = IGNORE_INDEX
    labels[1, :5] = IGNORE_INDEX
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def loss_and_grads(model, batch, num_items_in_batch):
    model.zero_grad()
    loss = model(**batch, num_items_in_batch=num_items_in_batch).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


class LossChunks(TorchDispatchMode):
    """Counts the fused loss's chunks: matrix products whose result has the vocabulary as last dimension."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.count = vocab_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.count += result.shape[-1] == self.vocab_size
        return result


def hook_loss_and_chunks(plugins, config, model, batch, num_items_in_batch):
    """The plugin's compute_loss hook (the trainer's path) and how many loss chunks it ran."""
    model.zero_grad()
    with LossChunks(model.config.vocab_size) as chunks:
        loss = plugins.hook.compute_loss(
            config=config, model=model, batch=batch, num_items_in_batch=num_items_in_batch, run=None
        )
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, chunks.count


def main():
    config, plugins = validate_config(
        {
            "plugins": ["liger"],
            "model": {"base": "tiny"},
            "train": {"output_dir": "unused"},
            "liger": {"rms_norm": False, "swiglu": False},
        }
    )
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    cases = [(arch, adapter) for arch in ("llama", "qwen3") for adapter in (False, True)]
    models, references = {}, {}
    for arch, adapter in cases:  # every reference before any patch: Liger's rope patch is module-wide
        model = tiny_model(arch)
        batch = packed_batch(model.config.vocab_size)
        num_items = (
            int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) * 2
        )  # as with 2 accumulated micro-batches
        models[arch, adapter] = copy.deepcopy(model)
        if adapter:
            torch.manual_seed(1)
            model = peft.get_peft_model(model, lora)
            for name, p in model.named_parameters():  # LoRA B starts at zero: give it a value to test
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02)
        references[arch, adapter] = (batch, num_items, *loss_and_grads(model, batch, num_items))
    for arch, adapter in cases:
        model = models[arch, adapter]
        plugins.hook.before_model_load(config=config, model_config=model.config, run=None)
        plugins.hook.patch_model(config=config, model=model, run=None)
        if adapter:
            torch.manual_seed(1)
            model = peft.get_peft_model(model, lora)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02)
        plugins.hook.after_model_load(config=config, model=model, run=None)
        batch, num_items, ref_loss, ref_grads = references[arch, adapter]
        with LossChunks(model.config.vocab_size) as liger_default:  # the model called as liger ships it
            loss_and_grads(model, batch, num_items)
        loss, grads, chunks = hook_loss_and_chunks(plugins, config, model, batch, num_items)
        if not adapter:  # as the Trainer prepares it under bf16 mixed precision: the forward wrapped
            mixed = Accelerator(mixed_precision="bf16", cpu=True).prepare_model(copy.deepcopy(model))
            assert hook_loss_and_chunks(plugins, config, mixed, batch, num_items)[2] == chunks
        grad_error = max(
            (grads[n] - g).abs().max().item() / (g.abs().max().item() + 1e-12) for n, g in ref_grads.items()
        )
        print(
            json.dumps(
                {
                    "arch": arch,
                    "lora": adapter,
                    "loss": loss.item(),
                    "reference": ref_loss.item(),
                    "max_rel_grad_error": grad_error,
                    "grads": len(grads),
                    "chunks": chunks,
                    "liger_default_chunks": liger_default.count,
                }
            )
        )


if __name__ == "__main__":
    main()
