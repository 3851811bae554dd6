"""Packing: bin-pack tokenized rows into rows of at most ``sequence_len`` tokens.

Rows are placed best-fit-decreasing. Each packed row carries ``position_ids`` that restart at 0
for every sequence: transformers derives the per-sequence attention boundaries from them (a
block-diagonal causal mask for eager/sdpa/flex, varlen kernels for flash attention), so no token
attends across sequences. The first label of every sequence is -100, so no token is trained to
predict the start of the next sequence either. Token data is moved with numpy and Arrow, never
row by row in Python.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np

from ftcore.data.cache import digest

IGNORE = -100


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of row indices: longest rows first, each into the fullest bin that still has room."""
    bins: list[list[int]] = []
    open_by_space: dict[int, list[int]] = {}  # remaining space -> bins with exactly that much room
    spaces: list[int] = []  # sorted keys of open_by_space
    for index in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[index])
        k = bisect_left(spaces, length)
        if k < len(spaces):
            space = spaces[k]
            bin_id = open_by_space[space].pop()
            if not open_by_space[space]:
                del open_by_space[space]
                spaces.pop(k)
        else:
            space, bin_id = capacity, len(bins)
            bins.append([])
        bins[bin_id].append(index)
        left = space - length
        if left > 0:
            if left not in open_by_space:
                open_by_space[left] = []
                insort(spaces, left)
            open_by_space[left].append(bin_id)
    return bins


def _values(column) -> np.ndarray:
    """The flattened values of an Arrow list column, as a writable numpy array."""
    import pyarrow.compute as pc

    return pc.list_flatten(column).to_numpy(zero_copy_only=False).copy()


def pack(dataset, sequence_len: int, seed: int | None = None):
    """A new ``datasets.Dataset`` of packed rows: input_ids, labels, position_ids.

    ``seed`` shuffles the order of the packed rows (None keeps the packing order).
    """
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:].select(["input_ids", "labels"])
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
    if len(lengths) and lengths.max() > sequence_len:
        raise ValueError(f"a row has {lengths.max()} tokens, more than sequence_len = {sequence_len}")
    bins = best_fit_decreasing(lengths, sequence_len)
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(bins))
        bins = [bins[i] for i in order]
    rows = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    ordered = table.take(pa.array(rows))  # the sequences one after the other, bin by bin
    row_lengths = lengths[rows]
    # where each sequence starts in the output, and each token's position inside it: +1 per token,
    # back to 0 at every start (int32 cumsum: positions stay below sequence_len)
    row_starts = np.concatenate(([0], np.cumsum(row_lengths)[:-1]))
    steps = np.ones(int(row_lengths.sum()), dtype=np.int32)
    steps[row_starts[1:]] = 1 - row_lengths[:-1]
    steps[:1] = 0
    positions = np.cumsum(steps, dtype=np.int32)
    labels = _values(ordered.column("labels"))
    labels[row_starts[row_lengths > 0]] = IGNORE
    first_rows = np.concatenate(([0], np.cumsum([len(b) for b in bins])[:-1])).astype(np.int64)
    bin_tokens = np.add.reduceat(row_lengths, first_rows) if len(rows) else np.zeros(0, np.int64)
    bin_offsets = np.concatenate(([0], np.cumsum(bin_tokens)))
    list_type = pa.LargeListArray if bin_offsets[-1] >= 2**31 else pa.ListArray
    bin_offsets = pa.array(bin_offsets.astype(np.int64 if list_type is pa.LargeListArray else np.int32))

    def column(values: np.ndarray):
        return list_type.from_arrays(bin_offsets, pa.array(values.astype(np.int32, copy=False)))

    packed = pa.table({
        "input_ids": column(_values(ordered.column("input_ids"))),
        "labels": column(labels),
        "position_ids": column(positions),
    })  # fmt: skip
    # a fingerprint from the input's: datasets would otherwise hash the whole table
    return datasets.Dataset(packed, fingerprint=digest("packed", dataset._fingerprint, sequence_len, seed))
