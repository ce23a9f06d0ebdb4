"""The AMX int8 path of the quantized CPU matmul (csrc/quant_amx.h) gives the VNNI kernel's bits
for every row, whatever the batch size, and TOKENMILL_NO_AMX keeps every call on VNNI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from cpu_kernel_utils import gguf_tensor

from tokenmill.kernels.cpu_quant import amx_usable, load_cpu_quant, quant_linear
from tokenmill.quant.packing import BlockWeights, pack_tiles, quantize_rtn

needs_amx = pytest.mark.skipif(
    load_cpu_quant() is None or not amx_usable(), reason="no usable AMX-INT8 on this host"
)

# Around the 16-row tile (and the 8-row VNNI pass), the AMX threshold (32) and prompt chunks.
ROWS = (*range(1, 18), 31, 32, 64, 255, 256, 512)


@pytest.fixture
def one_thread() -> Iterator[None]:
    # many small calls: on a busy host a 2-thread call waits for a descheduled worker
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def block_weight(fmt: str, n: int, k: int) -> BlockWeights:
    if fmt.startswith("Q"):
        return gguf_tensor(fmt, n, k, seed=n + k)[0].unpack()
    g = torch.Generator().manual_seed(n + k)
    return quantize_rtn(torch.randn(n, k, generator=g), 4 if fmt == "int4" else 8)


@needs_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("fmt", "n", "k"),
    [
        ("Q4_1", 37, 96),  # a partial tile, 3 blocks (a chunk of 4 dot products cut short)
        ("Q4_0", 16, 32),  # one tile, one block
        ("Q8_0", 70, 160),  # 8-bit records read in place; 5 blocks
        ("int4", 50, 320),  # 10 blocks: a full chunk of 8 and a short one
        ("int8", 33, 288),
    ],
)
@pytest.mark.usefixtures("one_thread")
def test_amx_matches_vnni_row_for_row(fmt: str, n: int, k: int, dtype: torch.dtype) -> None:
    bw = block_weight(fmt, n, k)
    packed = pack_tiles(bw)
    x = (torch.randn(max(ROWS), k, generator=torch.Generator().manual_seed(k)) * 3).to(dtype)
    x[5] = 0  # a zero row: scale 0 in every block
    alone = torch.cat([quant_linear(x[i : i + 1], packed, n, bw.bits, "vnni") for i in range(64)])
    for m in ROWS:
        amx = quant_linear(x[:m], packed, n, bw.bits, "amx")
        assert amx.dtype == dtype and amx.shape == (m, n)
        assert torch.equal(amx, quant_linear(x[:m], packed, n, bw.bits, "vnni")), m
        assert torch.equal(amx[:64], alone[:m]), m  # each row as computed alone
        assert torch.equal(quant_linear(x[:m], packed, n, bw.bits), amx), m  # the default path


@needs_amx
def test_amx_rows_on_two_threads() -> None:
    bw = block_weight("Q4_1", 200, 576)
    packed = pack_tiles(bw)
    x = torch.randn(100, 576, generator=torch.Generator().manual_seed(0)).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = quant_linear(x, packed, 200, 4, "vnni")
        torch.set_num_threads(2)
        assert torch.equal(quant_linear(x, packed, 200, 4, "amx"), expected)
        assert torch.equal(quant_linear(x[37:], packed, 200, 4, "amx"), expected[37:])
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(load_cpu_quant() is None, reason="no quantized CPU kernel here")
def test_no_amx_env_keeps_the_vnni_kernel() -> None:
    script = (
        "import torch\n"
        "from tokenmill.kernels.cpu_quant import amx_usable, quant_linear\n"
        "from tokenmill.quant.packing import pack_tiles, quantize_rtn\n"
        "assert not amx_usable()\n"
        "p = pack_tiles(quantize_rtn(torch.randn(20, 64), 4))\n"
        "x = torch.randn(40, 64)\n"
        "assert torch.equal(quant_linear(x, p, 20, 4), quant_linear(x, p, 20, 4, 'vnni'))\n"
        "try:\n"
        "    quant_linear(x, p, 20, 4, 'amx')\n"
        "    raise SystemExit('the AMX path ran with TOKENMILL_NO_AMX=1')\n"
        "except RuntimeError as e:\n"
        "    assert 'not usable' in str(e)\n"
    )
    env = {**os.environ, "TOKENMILL_NO_AMX": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
