"""Routing metadata: the (token, slot) assignments of a top-k router sorted by expert.

Row ``s`` of the grouped order belongs to expert ``expert_idxs[s]`` and to the assignment
``scattered_idxs[s]`` (``token * k + slot``); the rows of expert ``e`` are
``expert_ends[e-1]:expert_ends[e]``. No host synchronisation: everything stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Routing:
    expert_idxs: torch.Tensor  # (S,) expert of each grouped row, ascending
    scattered_idxs: torch.Tensor  # (S,) token * k + slot of each grouped row
    expert_ends: torch.Tensor  # (E,) end offset of each expert's rows (int32)
    k: int
    autotune: bool = True  # autotune the GEMM tiles (the [scattermoe] autotune option), else fixed tiles
    _blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def num_experts(self) -> int:
        return self.expert_ends.numel()

    @property
    def num_rows(self) -> int:
        return self.expert_idxs.numel()

    def expert_starts(self) -> torch.Tensor:
        return torch.cat([self.expert_ends.new_zeros(1), self.expert_ends[:-1]])

    def blocks(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tiles of ``block_m`` grouped rows that never cross an expert: (expert or -1, first row).

        The number of tiles is the static bound ``ceil(S / block_m) + E``; unused tiles carry
        expert -1 and exit at once.
        """
        if block_m not in self._blocks:
            starts, ends = self.expert_starts(), self.expert_ends
            tiles = (ends - starts + block_m - 1) // block_m
            tile_ends = torch.cumsum(tiles, 0)
            tile = torch.arange(-(-self.num_rows // block_m) + self.num_experts, device=ends.device)
            expert = torch.searchsorted(tile_ends, tile, right=True)
            valid = expert < self.num_experts
            expert = expert.clamp(max=self.num_experts - 1)
            first_row = starts[expert] + (tile - (tile_ends - tiles)[expert]) * block_m
            self._blocks[block_m] = (
                torch.where(valid, expert, -1).to(torch.int32),
                first_row.to(torch.int32),
            )
        return self._blocks[block_m]


def flatten_sort_count(top_k_index: torch.Tensor, num_experts: int, *, autotune: bool = True) -> Routing:
    """Sort the flattened (token, slot) assignments of ``top_k_index`` [T, k] by expert."""
    flat = top_k_index.reshape(-1)
    expert_idxs, scattered_idxs = torch.sort(flat, stable=True)
    experts = torch.arange(num_experts, device=flat.device, dtype=expert_idxs.dtype)
    expert_ends = torch.searchsorted(expert_idxs, experts, right=True).to(torch.int32)
    return Routing(expert_idxs, scattered_idxs, expert_ends, k=top_k_index.shape[-1], autotune=autotune)
