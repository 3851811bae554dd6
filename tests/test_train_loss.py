"""The default loss (``ftcore.loss``): the chunked output layer + cross-entropy against the model's own
loss and gradients (fp32, bf16, padded, packed, gradient accumulation), the size of what it
materialises, and the models that keep their own loss."""

import copy

import pytest
import torch
from ftcore.loss import ChunkedLoss, LogitsChanged, unsupported_reason
from ftcore.testing import TINY_SHAPE, random_batch, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

CHUNK_TOKENS = 37  # 512 tokens a batch: 14 chunks, the last one shorter


def padded(batch: dict) -> dict:
    """``batch`` as two right-padded rows: the second row's last 56 tokens are padding."""
    batch = dict(batch)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][1, 200:] = 0
    batch["labels"] = batch["labels"].clone()
    batch["labels"][1, 200:] = -100
    return batch


def loss_and_grads(model, batch, num_items_in_batch, chunked: ChunkedLoss | None = None):
    """The training loss as the Trainer computes it (labels and ``num_items_in_batch`` into the
    forward), its gradients, and the loss object's state."""
    model.train()
    if chunked is None:
        loss = model(**batch, num_items_in_batch=num_items_in_batch).loss
    else:
        with chunked.applied(model):
            loss = model(**batch, num_items_in_batch=num_items_in_batch).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def chunked_loss(model) -> ChunkedLoss:
    return ChunkedLoss(chunk_elements=CHUNK_TOKENS * model.config.get_text_config().vocab_size)


def assert_same(model, batch, num_items_in_batch, rtol=1e-5):
    chunked = chunked_loss(model)
    loss, grads = loss_and_grads(model, batch, num_items_in_batch, chunked)
    assert chunked.reason is None and chunked.verified
    reference, reference_grads = loss_and_grads(model, batch, num_items_in_batch)
    assert loss.item() == pytest.approx(reference.item(), rel=rtol)
    assert grads.keys() == reference_grads.keys() and grads
    for name, grad in reference_grads.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=rtol, atol=rtol * scale, msg=name)
    return loss


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fp32_loss_and_grads_equal_the_models_own(architecture, packed):
    model = tiny_model(architecture, tie_word_embeddings=architecture == "qwen3")
    batch = random_batch(TINY_SHAPE["vocab_size"], packed=packed)
    batch = batch if packed else padded(batch)
    trained = int((batch["labels"][:, 1:] != -100).sum())
    mean = assert_same(model, batch, None)
    accumulated = assert_same(model, batch, torch.tensor(3 * trained))  # one of 3 micro-batches
    assert accumulated.item() == pytest.approx(mean.item() / 3, rel=1e-5)


def test_gradient_accumulation_sums_to_the_whole_batch():
    """Two micro-batches normalised by the step's trained tokens give the whole batch's loss and gradients."""
    model = tiny_model("llama")
    batch = random_batch(TINY_SHAPE["vocab_size"], packed=True)
    whole, whole_grads = loss_and_grads(model, batch, None)
    count = (batch["labels"][:, 1:] != -100).sum()
    halves = [{key: value[i : i + 1] for key, value in batch.items()} for i in (0, 1)]
    results = [loss_and_grads(model, half, count, chunked_loss(model)) for half in halves]
    assert sum(loss.item() for loss, _ in results) == pytest.approx(whole.item(), rel=1e-5)
    for name, grad in whole_grads.items():
        summed = results[0][1][name] + results[1][1][name]
        torch.testing.assert_close(summed, grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_bf16_is_as_close_to_fp32_as_the_models_own_loss(packed):
    reference_model = tiny_model("qwen3")
    model = copy.deepcopy(reference_model).to(torch.bfloat16)
    batch = random_batch(TINY_SHAPE["vocab_size"], packed=packed)
    batch = batch if packed else padded(batch)
    reference, reference_grads = loss_and_grads(reference_model, batch, None)
    stock, stock_grads = loss_and_grads(model, batch, None)
    loss, grads = loss_and_grads(model, batch, None, chunked_loss(model))
    assert loss.item() == pytest.approx(stock.item(), rel=1e-4)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-3)
    for name, grad in reference_grads.items():
        chunked_error = ((grads[name].float() - grad).norm() / grad.norm()).item()
        stock_error = ((stock_grads[name].float() - grad).norm() / grad.norm()).item()
        # the output layer's weight gradient is summed over 14 chunks in bf16, as gradient accumulation sums
        assert chunked_error <= 1.5 * stock_error + 1e-3, name


def test_lora_with_tied_embeddings_and_softcapping():
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    gemma = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "gemma2", **TINY_SHAPE | {"tie_word_embeddings": True}, final_logit_softcapping=3.0
        )
    )
    assert_same(gemma, random_batch(TINY_SHAPE["vocab_size"], packed=True), None)
    model = peft.get_peft_model(
        tiny_model("qwen3", tie_word_embeddings=True),
        peft.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]),
    )
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)  # B starts at zero: make every LoRA gradient nonzero
    assert_same(model, random_batch(TINY_SHAPE["vocab_size"], packed=True), torch.tensor(100))


def test_moe_router_loss_is_added_as_by_the_model():
    model = tiny_model("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.5)
    batch = random_batch(TINY_SHAPE["vocab_size"], packed=False)
    assert model(**batch).aux_loss.item() > 0  # in the model's own loss, so in the one compared with
    assert_same(model, batch, None)


class LargestVocabularyTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operator returns whose last dimension is the
    vocabulary, leaving out the output layer's transposed weight and its gradient (hidden x vocabulary)."""

    def __init__(self, vocab_size, hidden_size):
        super().__init__()
        self.shape, self.largest = (hidden_size, vocab_size), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-1] == self.shape[1]:
                if tuple(tensor.shape) != self.shape:
                    self.largest = max(self.largest, tensor.numel())
        return out


def test_no_operator_returns_more_than_a_chunk_of_logits():
    vocab = 4096
    model = tiny_model("llama", vocab_size=vocab)
    batch = random_batch(vocab, packed=True)
    tokens = batch["input_ids"].numel()
    for chunked, expected in ((None, tokens * vocab), (ChunkedLoss(48 * vocab), 48 * vocab)):
        with LargestVocabularyTensor(vocab, TINY_SHAPE["hidden_size"]) as probe:
            loss_and_grads(model, batch, None, chunked)
        assert probe.largest == expected  # forward and backward


def test_chunks_under_accelerates_mixed_precision_wrapper():
    """The Trainer prepares the model with accelerate, which wraps its forward in autocast under
    bf16: still the model's own forward, so the loss is chunked."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    vocab = 4096
    AcceleratorState._reset_state(reset_partial_state=True)  # a GPU test before may have set it up
    try:
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        model = accelerator.prepare_model(tiny_model("llama", vocab_size=vocab))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert "forward" in vars(model)
    assert unsupported_reason(model) is None
    batch = random_batch(vocab, packed=True)
    with LargestVocabularyTensor(vocab, TINY_SHAPE["hidden_size"]) as probe:
        loss_and_grads(model, batch, None, ChunkedLoss(48 * vocab))
    assert probe.largest == 48 * vocab


def test_models_that_keep_their_own_loss():
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from transformers import AutoConfig, AutoModelForCausalLM

    batch = random_batch(TINY_SHAPE["vocab_size"], packed=False)
    fused = tiny_model("llama")
    apply_liger_kernel_to_llama(
        model=fused, fused_linear_cross_entropy=True, rope=False, rms_norm=False, swiglu=False
    )
    assert "not transformers' own" in unsupported_reason(fused)
    granite = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("granite", **TINY_SHAPE, logits_scaling=4.0)
    )
    assert "scales its logits" in unsupported_reason(granite)
    chunked = ChunkedLoss()
    loss, _ = loss_and_grads(granite, batch, None, chunked)
    assert loss.item() == pytest.approx(loss_and_grads(granite, batch, None)[0].item(), rel=1e-6)
    assert chunked.reason and not chunked.verified

    missed = ChunkedLoss()  # a logit transform the static checks miss is found on the first step
    missed.checked = True
    with pytest.raises(LogitsChanged), missed.applied(granite):
        granite(**batch)
    assert missed.reason == "its logits change after the output layer"
    assert "forward" not in vars(granite.get_output_embeddings()) and "_loss_function" not in vars(granite)


def test_a_run_with_no_tuning_keys_never_holds_the_logits_of_a_micro_batch(tmp_path, monkeypatch):
    import ftcore.loss
    from ftcore.config import validate_config
    from ftcore.metrics import read_metrics
    from ftcore.pipeline import run_training
    from ftcore.testing import asset, stories_model

    monkeypatch.setattr(ftcore.loss, "CHUNK_ELEMENTS", 16 * 512)  # 16 tokens of the 512-token vocabulary
    raw = {
        "model": {"base": str(stories_model()), "chat_template": "chatml"},
        "datasets": [{"path": str(asset("data/instructions/instructions_2000.jsonl")), "format": "alpaca"}],
        "train": {
            "output_dir": str(tmp_path / "out"),
            "sequence_len": 128,
            "micro_batch_size": 4,
            "max_steps": 2,
            "logging_steps": 1,
        },
    }
    config, plugins = validate_config(raw)
    with LargestVocabularyTensor(512, 64) as probe:
        run_training(config, plugins)
    assert probe.largest == 16 * 512
    assert [row["step"] for row in read_metrics(tmp_path / "out") if "loss" in row] == [1, 2]
