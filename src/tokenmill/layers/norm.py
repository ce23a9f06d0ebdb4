"""RMSNorm, computed in float32 like HF's LlamaRMSNorm, with an optional fused residual add."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels.cpu_fused import fused_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); the sum is the next residual stream."""
        ops = fused_ops(x)
        if ops is not None:
            return ops.add_rms_norm.default(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        residual = x
        dtype = x.dtype
        if dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps), residual
        # HF normalizes in fp32, rounds to the input dtype, then scales by the weight.
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(dtype)
        return self.weight * normed, residual
