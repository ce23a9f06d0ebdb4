"""What one forward pass needs beside the tokens, built once per step and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ForwardContext:
    """Ragged, padding-free batch: every activation is [num_tokens, ...].

    slot_mapping[i] is the cache slot (block_id * block_size + offset) that token i's KV goes to.
    `attn_meta` is what the step's attention backend built for it (`AttentionBackend`); models
    pass it along and never look inside.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64
    attn_meta: Any
