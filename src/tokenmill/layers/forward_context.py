"""What one forward pass needs beside the tokens, built once per step and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ForwardContext:
    """Ragged, padding-free batch: every activation is [num_tokens, ...].

    One entry per KV cache group (a layer reads its own, `PagedAttention.kv_group`):
    slot_mappings[g][i] is the slot (block_id * block_size + offset) of group g's cache that
    token i's KV goes to; attn_metas[g] is what the step's attention backend built from group
    g's block tables (`AttentionBackend`). Models pass it along and never look inside.
    """

    slot_mappings: list[torch.Tensor]  # [num_tokens] int64 each
    attn_metas: list[Any]
