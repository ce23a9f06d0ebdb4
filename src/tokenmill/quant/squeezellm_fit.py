"""SqueezeLLM quantization (Kim et al. 2023, arXiv 2306.07629): dense-and-sparse decomposition
plus sensitivity-weighted non-uniform k-means, one lookup table per output row.

Sensitivity: the paper weighs each weight by the diagonal of the Fisher information (mean
squared gradient over calibration data). tokenmill has no backward pass, so we weigh by the
diagonal of the layer's input Hessian, E[x_k^2] over calibration activations (the weight of
input channel k, shared by every output row): the squared-error proxy of GPTQ / OBQ. For a row w
and codes c, it minimises sum_k E[x_k^2] (w_k - lut[c_k])^2, which is the expected squared error
of that row's output under a diagonal input covariance.

Dense-and-sparse: the `sparsity` fraction of a matrix's largest-magnitude weights (0.45% by
default, the paper's setting) get weight zero in the clustering and are kept exactly in a CSR
matrix as their residual w - lut[code] (float32), so that lut[code] + sparse == w there up to
one float32 rounding of the addition (the code there is the nearest centroid, so the residual is
small and the dense part needs no hole).
"""

from __future__ import annotations

import torch

from tokenmill.quant.squeezellm import SqueezeLLMWeights, pack_codes

KMEANS_ITERS = 12  # Lloyd iterations from each of the two starts


def _nearest(w: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every w [R, C], with lut [R, k] sorted along k."""
    mids = (lut[:, 1:] + lut[:, :-1]) * 0.5
    return torch.searchsorted(mids.contiguous(), w.contiguous())


def _lloyd(w: torch.Tensor, weight: torch.Tensor, lut: torch.Tensor, iters: int) -> torch.Tensor:
    for _ in range(iters):
        codes = _nearest(w, lut)
        num = torch.zeros_like(lut).scatter_add_(1, codes, weight * w)
        den = torch.zeros_like(lut).scatter_add_(1, codes, weight)
        # an empty cluster keeps its centroid; sorting keeps the midpoint search valid
        lut = torch.where(den > 0, num / den.clamp_min(1e-30), lut).sort(dim=1).values
    return lut


def weighted_kmeans(
    w: torch.Tensor, weight: torch.Tensor, k: int, iters: int = KMEANS_ITERS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted 1-D Lloyd k-means of every row of w [R, C] at once (weight [R, C] or [C],
    >= 0). Returns (lut float32 [R, k] sorted, codes int64 [R, C]).

    Two starts per row, keeping the one with the lower weighted error: the row's quantiles (at
    (i + 0.5) / k), and the uniform grid over the row's [min, max] of weighted entries. From the
    uniform grid, the first assignment is round-to-nearest's and Lloyd never increases the
    objective, so the result is never worse than per-row RTN with the same number of levels."""
    w = w.float()
    weight = weight.float().expand_as(w)
    probs = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    quantile = torch.quantile(w, probs, dim=1).T.contiguous()  # [R, k]
    inside = weight > 0  # outliers (weight 0) do not stretch the grid
    big = torch.finfo(torch.float32).max
    lo = torch.where(inside, w, big).amin(1, keepdim=True)
    hi = torch.where(inside, w, -big).amax(1, keepdim=True)
    lo, hi = torch.where(lo <= hi, lo, 0.0), torch.where(lo <= hi, hi, 0.0)  # all-zero weights
    uniform = lo + (hi - lo) * torch.linspace(0, 1, k).unsqueeze(0)
    best, best_err = None, None
    for start in (quantile, uniform):
        lut = _lloyd(w, weight, start, iters)
        err = (weight * (w - lut.gather(1, _nearest(w, lut))) ** 2).sum(1)
        if best is None or best_err is None:
            best, best_err = lut, err
        else:
            better = (err < best_err).unsqueeze(1)
            best, best_err = torch.where(better, lut, best), torch.minimum(err, best_err)
    assert best is not None
    return best, _nearest(w, best)


def outlier_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True at the round(sparsity * numel) largest |w| of the matrix (ties broken by topk)."""
    n = round(sparsity * w.numel())
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    if n > 0:
        mask[w.abs().flatten().topk(n).indices] = True
    return mask.view(w.shape)


def quantize_squeezellm(
    w: torch.Tensor,
    sensitivity: torch.Tensor | None,
    bits: int,
    sparsity: float = 0.0045,
    iters: int = KMEANS_ITERS,
) -> SqueezeLLMWeights:
    """Quantizes w [R, C] with per-input-channel sensitivity [C] (None: all ones)."""
    if bits not in (3, 4):
        raise ValueError(f"SqueezeLLM bits must be 3 or 4, got {bits}")
    rows, cols = w.shape
    w = w.float()
    s = torch.ones(cols) if sensitivity is None else sensitivity.float().clamp_min(0)
    # a channel never seen active still counts a little: its weights get some centroid
    s = s + 1e-6 * s.mean().clamp_min(1e-30)
    mask = outlier_mask(w, sparsity)
    weight = s.expand(rows, cols) * (~mask)
    lut, _ = weighted_kmeans(w, weight, 1 << bits, iters)
    lut16 = lut.half()  # stored in fp16: assign against the values the kernel will use
    codes = _nearest(w, lut16.float())
    deq = lut16.float().gather(1, codes)
    # CSR built by hand (torch's sparse CSR is beta and warns): row-major order of the outliers
    rows_idx, cols_idx = mask.nonzero(as_tuple=True)
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows_idx, minlength=rows).cumsum(0)
    return SqueezeLLMWeights(
        codes=pack_codes(codes),
        lut=lut16,
        crow=crow.to(torch.int32),
        col=cols_idx.to(torch.int32),
        val=w[mask] - deq[mask],  # the residual: lut[code] + val == w at the outliers
        bits=bits,
        cols=cols,
    )
