"""The data path (DESIGN.md "Data contract"): sources -> row formats -> tokenize and mask -> pack -> cache.

``prepare_sft_data(config, plugins, tokenizer)`` returns a ``DataBundle`` of tokenized, masked
(and, with ``train.packing``, packed) train/eval datasets with its fingerprint and statistics;
``load_rows(config, plugins, schemas)`` returns canonical rows for methods that tokenize
themselves, and ``encode(tokenizer, text or messages, split_special_tokens=...)`` tokenizes their
prompts and completions as SFT data is (special tokens spelled out in row text kept as plain text).
``ftcore.data.collate.SFTCollator`` batches the tokenized rows.
"""

from ftcore.data.prepare import DataBundle, load_rows, prepare_sft_data
from ftcore.data.tokenize import encode

__all__ = ["DataBundle", "encode", "load_rows", "prepare_sft_data"]
