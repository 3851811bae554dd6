"""QLoRA on a CUDA GPU: the real stories260K model with a bitsandbytes 4-bit base trains, saves and reloads."""

import pytest
import torch
from ftcore.config import validate_config
from ftcore.model import load_model_and_tokenizer, save_pretrained
from ftcore.testing import stories_model

pytestmark = pytest.mark.gpu
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog."


def test_qlora_trains_a_4bit_base_and_the_adapter_reloads(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import AutoPeftModelForCausalLM

    raw = {
        "model": {"base": str(stories_model()), "gradient_checkpointing": True},
        "adapter": {"kind": "qlora", "r": 8, "alpha": 16},
        "train": {"output_dir": str(tmp_path / "out")},
    }
    config, plugins = validate_config(raw)
    model, tokenizer = load_model_and_tokenizer(config, plugins)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 5 * 7  # every linear layer of the 5 blocks is 4-bit; lm_head stays dense
    assert quantized[0].weight.quant_state.quant_type == "nf4"
    assert all(p.device.type == "cuda" for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)

    batch = tokenizer(STORY, return_tensors="pt").to("cuda")
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print(f"QLoRA on {torch.cuda.get_device_name()}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")  # fmt: skip
    assert losses[-1] < 0.8 * losses[0]

    with torch.no_grad():
        trained_loss = model.eval()(**batch, labels=batch["input_ids"]).loss.item()
    save_pretrained(model, tokenizer, tmp_path / "adapter")
    reloaded = AutoPeftModelForCausalLM.from_pretrained(
        tmp_path / "adapter", quantization_config=model.config.quantization_config, device_map={"": 0}
    )
    with torch.no_grad():
        reloaded_loss = reloaded.eval()(**batch, labels=batch["input_ids"]).loss.item()
    print(
        f"eval loss: trained {trained_loss:.4f}, adapter reloaded on a fresh 4-bit base {reloaded_loss:.4f}"
    )
    assert abs(reloaded_loss - trained_loss) < 0.05 * trained_loss + 1e-3
