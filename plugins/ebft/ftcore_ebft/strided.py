"""Strided mode: block-parallel generation inside documents, all blocks in one forward pass.

A document of S tokens is followed by B = anchors x n generated blocks of G tokens each. Original
tokens attend causally; the tokens of a block anchored at ``a`` attend to the ``context_length``
original tokens before ``a`` and to their own block's earlier tokens, never to another block. Block
tokens take the positions ``a, a + 1, ...`` they would have in the document, so each block is
what generating it alone after its anchor gives. The mask is a flex-attention ``BlockMask`` when
the model runs flex attention (a GPU), else the equivalent dense 4-D mask.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from ftcore.errors import DataError
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from ftcore_ebft.features import FeatureNetwork, pool
from ftcore_ebft.reward import advantages, group_rewards

log = logging.getLogger("ftcore.data")


def anchors(length: int, prompt_length: int, ebft) -> list[int]:
    """Anchor positions: ``anchor_offset + k x stride``, at least ``min_completion_prefix`` tokens past the
    prompt (and past the first token), with ``generate_max_len`` reference tokens after them."""
    first = max(1, prompt_length + ebft.min_completion_prefix)
    last = length - ebft.generate_max_len
    return [a for a in range(ebft.anchor_offset, last + 1, ebft.stride) if a >= first]


FLEX_BLOCK = 128
"""Flex attention's block size: under flex the sequence is padded to a multiple of it (fewer shapes to
compile; the CPU kernel computed wrong values for a sequence shorter than one block)."""


@dataclass
class Layout:
    """Where everything sits in the one sequence: S original tokens, then the blocks (anchor-major), then
    padding up to a multiple of ``pad_to`` (pad positions see earlier tokens; nothing real sees them)."""

    length: int
    anchors: list[int]
    samples: int
    block: int
    context: int
    pad_to: int = 1

    @property
    def blocks(self) -> int:
        return len(self.anchors) * self.samples

    @property
    def used(self) -> int:
        """Original and generated tokens, padding excluded."""
        return self.length + self.blocks * self.block

    @property
    def total(self) -> int:
        return -(-self.used // self.pad_to) * self.pad_to

    def tensors(self, device=None):
        """(block of each position, -1 = original; anchor of its block; its position id)."""
        S, G = self.length, self.block
        block_of = torch.full((self.total,), -1, dtype=torch.long)
        anchor_of = torch.zeros(self.total, dtype=torch.long)
        positions = torch.arange(self.total)
        for b in range(self.blocks):
            a = self.anchors[b // self.samples]
            span = slice(S + b * G, S + (b + 1) * G)
            block_of[span], anchor_of[span], positions[span] = b, a, torch.arange(a, a + G)
        return block_of.to(device), anchor_of.to(device), positions.to(device)

    def mask_mod(self, device=None):
        """``mask_mod(batch, head, q, kv) -> bool`` (flex attention's signature, works on index tensors)."""
        block_of, anchor_of, _ = self.tensors(device)
        S, C = self.length, self.context

        def mask_mod(b, h, q, kv):
            causal = kv <= q
            original = q < S
            anchor = anchor_of[q]
            window = (kv < S) & (kv >= anchor - C) & (kv < anchor)
            own = (block_of[kv] == block_of[q]) & causal
            return (original & causal) | (~original & (window | own))

        return mask_mod

    def dense_mask(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """The (1, 1, T, T) additive mask: 0 where attention is allowed, the dtype's minimum elsewhere."""
        index = torch.arange(self.total, device=device)
        allowed = self.mask_mod(device)(0, 0, index[:, None], index[None, :])
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]

    def block_mask(self, device):
        """The flex-attention ``BlockMask`` of the same pattern."""
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(self.mask_mod(device), None, None, self.total, self.total, device=device)

    def logit_positions(self) -> torch.Tensor:
        """(B, G): the position whose logits predict each block token (its anchor's last token, then the block)."""
        S, G = self.length, self.block
        rows = []
        for b in range(self.blocks):
            start = S + b * G
            rows.append([self.anchors[b // self.samples] - 1, *range(start, start + G - 1)])
        return torch.tensor(rows, dtype=torch.long).reshape(self.blocks, G)


def uses_flex(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == "flex_attention"


def attention_mask(model, layout: Layout, device):
    """A ``BlockMask`` under flex attention, else the dense 4-D mask in the model's dtype."""
    if uses_flex(model):
        return layout.block_mask(device)
    return layout.dense_mask(next(model.parameters()).dtype, device)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """One token per row from logits / temperature, within the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # generator: on the logits' device


@torch.no_grad()
def generate_blocks(model, ids: torch.Tensor, layout: Layout, mask, ebft, generator) -> torch.Tensor:
    """The full sequence (T,) with every block sampled, one token per block per forward pass."""
    _, _, positions = layout.tensors(ids.device)
    sequence = torch.cat([ids, ids.new_zeros(layout.total - layout.length)])
    where = layout.logit_positions().to(ids.device)
    starts = layout.length + torch.arange(layout.blocks, device=ids.device) * layout.block
    for t in range(layout.block):
        out = model(
            input_ids=sequence[None],
            position_ids=positions[None],
            attention_mask=mask,
            logits_to_keep=where[:, t],
        )
        sequence[starts + t] = sample(out.logits[0], ebft.temperature, ebft.top_p, generator)
    return sequence


def token_logprobs(hidden, head, targets, chunk: int, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) of each (N, H) hidden state, the output layer applied ``chunk`` rows at a time (each
    chunk recomputed in backward, so no (N, vocab) logits are kept)."""

    def piece(h, t):  # h may be float32: mixed precision hands the model's outputs back in float32
        logits = head(h.to(head.weight.dtype)).float() / temperature
        return logits.gather(-1, t[:, None]).squeeze(-1) - logits.logsumexp(-1)

    parts = [
        checkpoint(piece, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
        for i in range(0, hidden.shape[0], chunk)
    ]
    return torch.cat(parts)


@dataclass
class DocumentResult:
    loss: torch.Tensor
    terms: dict[str, float]


def document_loss(model, network: FeatureNetwork, ids: torch.Tensor, prompt_length: int, ebft, generator):
    """Generate, score and compute ``rl_coef x RL + ce_coef x CE`` for one document (which has an anchor)."""
    points = anchors(len(ids), prompt_length, ebft)
    pad_to = FLEX_BLOCK if uses_flex(model) else 1
    layout = Layout(
        len(ids), points, ebft.n_samples_per_prompt, ebft.generate_max_len, ebft.context_length, pad_to
    )
    mask = attention_mask(model, layout, ids.device)
    sequence = generate_blocks(model, ids, layout, mask, ebft, generator)
    _, _, positions = layout.tensors(ids.device)

    states = network.states(sequence[None], mask, positions[None])[0]
    S, G, n = layout.length, layout.block, layout.samples
    generated = states[S : layout.used].reshape(layout.blocks, G, -1)
    reference = torch.stack([states[a : a + G] for a in points])
    both = torch.cat([generated, reference])
    ends = torch.full((both.shape[0],), G, device=both.device)
    features = pool(both, ends, torch.zeros_like(ends), ebft.embed_method)
    gen_features, ref_features = features[: layout.blocks], features[layout.blocks :]
    groups = [
        group_rewards(
            gen_features[k * n : (k + 1) * n],
            ref_features[k],
            ebft.alignment_coef,
            ebft.diversity_coef,
            use_whitening=ebft.use_whitening,
        )
        for k in range(len(points))
    ]
    rewards = torch.stack([g.rewards for g in groups])
    advantage = advantages(rewards, ebft.advantage_estimator).reshape(-1)

    # the final states (after the last norm) through the model's own forward (DDP-safe); logits for one position
    hidden = model(
        input_ids=sequence[None],
        position_ids=positions[None],
        attention_mask=mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    ).hidden_states[-1][0]
    head = getattr(model, "module", model).get_output_embeddings()  # through a DDP wrapper too
    where = layout.logit_positions().to(ids.device).reshape(-1)
    block_tokens = sequence[S : layout.used]
    logp = token_logprobs(hidden[where], head, block_tokens, ebft.lm_head_chunk, ebft.temperature)
    rl = -(advantage.to(logp.device) * logp.reshape(layout.blocks, G).mean(-1)).mean()
    loss = ebft.rl_coef * rl
    terms = {
        "ebft/alignment": torch.stack([g.alignment for g in groups]).mean().item(),
        "ebft/diversity": torch.stack([g.diversity for g in groups]).mean().item(),
        "ebft/cfm_loss": sum(g.cfm_loss for g in groups) / len(groups),
        "ebft/reward": rewards.mean().item(),
        "ebft/rl_loss": rl.item(),
        "ebft/anchors": float(len(points)),
    }
    if ebft.ce_coef:
        first = max(prompt_length, 1)
        ce = -token_logprobs(hidden[first - 1 : S - 1], head, ids[first:], ebft.lm_head_chunk).mean()
        loss = loss + ebft.ce_coef * ce
        terms["ebft/ce_loss"] = ce.item()
    return DocumentResult(loss, terms)


class StridedTrainer(Trainer):
    """A ``Trainer`` whose loss is the strided EBFT loss of each document of the micro-batch."""

    def __init__(self, *args, ftcore_run, network: FeatureNetwork, **kwargs):
        super().__init__(*args, **kwargs)
        self.ftcore_run, self.network = ftcore_run, network
        self._terms: dict[str, list[float]] = {}
        self._terms_step, self._draws = -1, 0
        from ftcore.train import remove_default_printer

        remove_default_printer(self)

    def _generator(self, device) -> torch.Generator:
        """Sampling on ``device`` seeded by train.seed, the optimizer step and the draw within it (same on resume)."""
        key = f"ebft-{self.args.seed}-{self.state.global_step}-{self._draws}"
        self._draws += 1
        return torch.Generator(device=device).manual_seed(random.Random(key).getrandbits(63))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.state.global_step != self._terms_step:
            self._terms, self._terms_step, self._draws = {}, self.state.global_step, 0
        ebft = self.ftcore_run.config.ebft
        # document tokens read, for the progress line's tok/s
        self.state.num_input_tokens_seen += sum(len(ids) for ids in inputs["documents"])
        results = [
            document_loss(model, self.network, ids, length, ebft, self._generator(ids.device))
            for ids, length in zip(inputs["documents"], inputs["prompt_lengths"], strict=True)
        ]
        for result in results:
            for name, value in result.terms.items():
                self._terms.setdefault(name, []).append(value)
        self.ftcore_run.log_metrics({name: sum(v) / len(v) for name, v in self._terms.items()})
        return torch.stack([r.loss for r in results]).mean()


def collate(rows):
    return {
        "documents": [torch.tensor(row["input_ids"], dtype=torch.long) for row in rows],
        "prompt_lengths": [row["prompt_length"] for row in rows],
    }


def prepare_documents(config, plugins, tokenizer):
    """(train rows {input_ids, prompt_length}, fingerprint) of the ``prompt_completion`` / ``text`` datasets."""
    from ftcore.data import load_rows
    from ftcore.data.cache import data_fingerprint, digest
    from ftcore.data.prepare import dataset_specs

    schemas = ("prompt_completion", "text")
    specs = dataset_specs(config, plugins, schemas)
    train, _ = load_rows(config, plugins, schemas)
    limit = config.train.sequence_len

    def tokenize(row):
        prompt = row.get("prompt") or ""
        completion = row.get("completion") if row.get("completion") is not None else row["text"]
        ids = list(tokenizer(prompt + completion)["input_ids"])[:limit]
        prompt_length = len(tokenizer(prompt)["input_ids"]) if prompt else 0
        return {"input_ids": ids, "prompt_length": min(prompt_length, len(ids))}

    rows = train.map(tokenize, remove_columns=train.column_names, desc="Tokenizing documents")
    keep = [
        i for i, row in enumerate(rows) if anchors(len(row["input_ids"]), row["prompt_length"], config.ebft)
    ]
    if len(keep) < len(rows):
        log.warning(
            "ebft: %d documents dropped: too short for an anchor with its reference tokens",
            len(rows) - len(keep),
        )
        rows = rows.select(keep)
    if not len(rows):
        raise DataError(
            f"no document is long enough for an anchor: each needs more than prompt + min_completion_prefix + "
            f"generate_max_len ({config.ebft.generate_max_len}) tokens; lower generate_max_len or use longer texts"
        )
    e = config.ebft
    placement = (e.stride, e.anchor_offset, e.min_completion_prefix, e.generate_max_len)
    fingerprint = digest("ebft-strided", 1, data_fingerprint(config, specs, plugins, tokenizer), placement)
    return rows, fingerprint


def build_trainer(run):
    from ftcore.train import one_gpu_per_process, training_arguments
    from transformers import TrainingArguments

    config = run.config
    rows, run.data_fingerprint = prepare_documents(config, run.plugins, run.tokenizer)
    args = one_gpu_per_process(
        TrainingArguments(
            **{
                **training_arguments(config, run.output_dir, has_eval=False),
                "include_num_input_tokens_seen": "no",
            }
        )
    )
    ebft = config.ebft
    network = FeatureNetwork(run.model, ebft.feature_layers, ebft.feature_device)
    return StridedTrainer(
        model=run.model,
        args=args,
        train_dataset=rows,
        data_collator=collate,
        processing_class=run.tokenizer,
        callbacks=run.callbacks,
        ftcore_run=run,
        network=network,
    )


def preview_lines(config, plugins, tokenizer, n: int, *, color: bool = False) -> list[str]:
    """The first ``n`` documents with their prompt tokens marked untrained, and the anchor count."""
    from ftcore.data.preview import IGNORE, render_row

    rows, fingerprint = prepare_documents(config, plugins, tokenizer)
    lines = []
    for index in range(min(n, len(rows))):
        ids, prompt = rows[index]["input_ids"], rows[index]["prompt_length"]
        labels = [IGNORE] * prompt + ids[prompt:]
        lines += [
            f"=== document {index} ({len(ids)} tokens, {len(anchors(len(ids), prompt, config.ebft))} anchors) ===",
            render_row(tokenizer, {"input_ids": ids, "labels": labels}, color=color),
            "",
        ]
    return [*lines, f"data fingerprint {fingerprint}", f"documents        {len(rows):,}"]
