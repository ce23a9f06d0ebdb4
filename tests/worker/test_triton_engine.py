"""The GPU kernels inside the whole engine, on the CPU: with TRITON_INTERPRET=1 the Triton
paged attention (`--attention-backend triton`) and the Triton quantized matmul (int4 weights,
forced onto the Triton path) run a tiny model end to end, with chunked prefill and a mixed
decode/prefill batch, and give the reference backends' greedy tokens. This checks the wiring
(strided q views of the fused qkv output, the unified metadata, the packed GPU weight layout
behind Linear) that the kernel tests check in isolation; speed needs a GPU."""

from __future__ import annotations

import pytest

from utils_triton import CUDA, interpreted  # sets TRITON_INTERPRET first

pytest.importorskip("triton")

from tokenmill import SamplingParams  # noqa: E402
from tokenmill.kernels import triton_attention as triton_attn  # noqa: E402
from tokenmill.kernels import triton_quant
from tokenmill.quant import block as block_method  # noqa: E402
from utils_tiny import make_tiny_hf_folder  # noqa: E402

pytestmark = pytest.mark.skipif(CUDA, reason="the interpreter runs on CPU")

interpreted(triton_attn)
interpreted(triton_quant)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(make_tiny_hf_folder(tmp_path_factory.mktemp("triton-engine"), vocab_size=512))


PROMPTS = [[(5 * i + 11 * j) % 500 + 1 for j in range(n)] for i, n in enumerate((4, 30, 13))]


def _greedy(llm) -> list[list[int]]:
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _kw(tiny_model: str, **kw) -> dict:
    # an 8-token budget: prompts go in chunks beside decode rows
    return dict(model=tiny_model, dtype="float32", device="cpu", num_kv_blocks=32,
                max_num_batched_tokens=8, **kw)  # fmt: skip


def test_triton_attention_in_the_engine(make_llm, tiny_model):
    ref = _greedy(make_llm(**_kw(tiny_model, attention_backend="unified-ref")))
    llm = make_llm(**_kw(tiny_model, attention_backend="triton"))
    assert llm.engine.runner.attn_backend.name == "triton"
    assert _greedy(llm) == ref


@pytest.mark.slow  # the Triton interpreter through every layer: heavy
def test_triton_quantized_matmul_in_the_engine(make_llm, tiny_model, monkeypatch):
    ref = _greedy(make_llm(**_kw(tiny_model, quantization="int4")))  # the C++ / dense path
    monkeypatch.setattr(block_method, "_use_triton", lambda device: True)
    llm = make_llm(**_kw(tiny_model, quantization="int4"))
    modules = llm.engine.runner.model.modules()
    methods = [m.quant_method for m in modules if hasattr(m, "quant_method")]
    methods = [m for m in methods if isinstance(m, block_method.BlockQuantMethod)]
    assert methods and all(m.gpu_weight is not None for m in methods)
    assert _greedy(llm) == ref
