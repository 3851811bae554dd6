"""Regenerate the offline quickstart's files in examples/quickstart/ (committed; no network needed).

- model/: a ~1M-parameter Llama config and a byte-level tokenizer built in code (256 byte tokens plus
  chat markers), with a small chat template. The quickstart trains it from random init.
- addition_train.jsonl: single-digit additions as chats in five phrasings; addition_heldout.jsonl:
  20 (phrasing, a, b) prompts the training rows never contain (each sum is seen in other
  phrasings), for `ftcore generate` and the accuracy test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "examples" / "quickstart"
SPECIAL = ["<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PHRASES = [
    "What is {a} + {b}?",
    "{a} + {b} = ?",
    "Compute {a} + {b}.",
    "How much is {a} + {b}?",
    "{a} + {b}?",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for char in sorted(byte_chars):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        model_max_length=64,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    from transformers import LlamaConfig

    (HERE / "model").mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(HERE / "model")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(HERE / "model")
    rng = random.Random(0)
    combos = [(phrase, a, b) for phrase in PHRASES for a in range(10) for b in range(10)]
    rng.shuffle(combos)
    heldout, train = combos[:20], combos[20:]
    rows = [
        {
            "messages": [
                {"role": "user", "content": phrase.format(a=a, b=b)},
                {"role": "assistant", "content": str(a + b)},
            ]
        }
        for phrase, a, b in train * 2
    ]
    rng.shuffle(rows)
    (HERE / "addition_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [{"prompt": phrase.format(a=a, b=b), "answer": str(a + b)} for phrase, a, b in heldout]
    (HERE / "addition_heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))


if __name__ == "__main__":
    main()
