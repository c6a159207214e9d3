"""Batches: how a group of pairs' ids become tensors.

One batch layout serves every forward path: prompts left-padded (so all prompts end at the same column
and the answers can continue from a shared KV cache), answers right-padded. The plain path rebuilds
ordinary right-padded prompt+answer rows from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from preftune.data.tokenize import TokenizedPair


@dataclass
class Batch:
    """Tensors for B pairs. Shapes: prompt_* [B, Tp], chosen_* [B, Tc], rejected_* [B, Tr] (None for SFT)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    chosen_ids: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_ids: torch.Tensor | None
    rejected_mask: torch.Tensor | None
    indices: torch.Tensor  # [B] positions of these pairs in the tokenized dataset (for cached reference log-probs)
    desirable: torch.Tensor | None = None  # [B] bool: unpaired examples' labels (None for pairs and SFT)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Unique real tokens: each prompt once, plus the answers."""
        n = self.prompt_mask.sum() + self.chosen_mask.sum()
        if self.rejected_mask is not None:
            n = n + self.rejected_mask.sum()
        return int(n)

    def to(self, device: torch.device | str) -> Batch:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(*(mv(getattr(self, f)) for f in self.__dataclass_fields__))


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def collate(pairs: Sequence[TokenizedPair], positions: Sequence[int], pad_id: int) -> Batch:
    prompt_ids, prompt_mask = _pad([p.prompt_ids for p in pairs], pad_id, left=True)
    chosen_ids, chosen_mask = _pad([p.chosen_ids for p in pairs], pad_id, left=False)
    rejected_ids = rejected_mask = None
    if pairs[0].rejected_ids is not None:
        rejected_ids, rejected_mask = _pad([p.rejected_ids for p in pairs], pad_id, left=False)
    desirable = torch.tensor([bool(p.label) for p in pairs]) if pairs[0].label is not None else None
    return Batch(prompt_ids, prompt_mask, chosen_ids, chosen_mask, rejected_ids, rejected_mask,
                 torch.tensor(list(positions), dtype=torch.long), desirable)
