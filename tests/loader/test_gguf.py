"""GGUF reading: config, dequantization (bit-exact vs gguf/transformers), un-permutation, errors."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.loader.gguf import read_gguf
from utils_default import DEFAULT_GGUF, needs_default


@pytest.fixture(scope="module")
def smol():
    return read_gguf(DEFAULT_GGUF)


@pytest.fixture(scope="module")
def smol_state(smol):
    return dict(smol.iter_tensors())


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


class _PlainArrayReader(gguf.GGUFReader):
    """gguf's own parser over a base-ndarray view: np.memmap slicing makes it ~3x slower."""

    def _get(self, *args, **kwargs):
        if type(self.data) is np.memmap:
            self.data = self.data.view(np.ndarray)
        return super()._get(*args, **kwargs)


def _transformers_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' TensorProcessor._reverse_permute_weights."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


@needs_default
def test_default_config(smol):
    cfg = smol.hf_config()
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    mc = ModelConfig.from_hf_dict(cfg)
    assert (mc.vocab_size, mc.hidden_size, mc.intermediate_size) == (49152, 576, 1536)
    assert (mc.num_hidden_layers, mc.num_attention_heads, mc.num_key_value_heads) == (30, 9, 3)
    assert mc.head_dim == 64
    assert mc.tie_word_embeddings and not mc.attention_bias
    assert mc.rope_theta == 100000.0 and mc.rope_scaling is None
    assert mc.rms_norm_eps == pytest.approx(1e-5)
    assert mc.max_position_embeddings == 8192
    assert mc.bos_token_id == 1 and mc.eos_token_ids == (2,)


@pytest.mark.slow  # every tensor of the default model
@needs_default
def test_default_names_and_shapes(smol_state):
    assert len(smol_state) == 272
    assert "lm_head.weight" not in smol_state
    assert smol_state["model.embed_tokens.weight"].shape == (49152, 576)
    assert smol_state["model.norm.weight"].shape == (576,)
    layer = "model.layers.29."
    shapes = {
        "self_attn.q_proj.weight": (576, 576),
        "self_attn.k_proj.weight": (192, 576),
        "self_attn.v_proj.weight": (192, 576),
        "self_attn.o_proj.weight": (576, 576),
        "mlp.gate_proj.weight": (1536, 576),
        "mlp.up_proj.weight": (1536, 576),
        "mlp.down_proj.weight": (576, 1536),
        "input_layernorm.weight": (576,),
        "post_attention_layernorm.weight": (576,),
    }
    for suffix, shape in shapes.items():
        t = smol_state[layer + suffix]
        assert t.shape == shape and t.dtype == torch.float32


@pytest.mark.slow  # every tensor of the default model
@needs_default
def test_default_matches_gguf_dequantize(smol, smol_state):
    """Every tensor equals gguf.quants.dequantize of an independently parsed file, un-permuted."""
    reader = _PlainArrayReader(DEFAULT_GGUF)
    for t in reader.tensors:
        ref = dequantize(t.data, t.tensor_type)
        if ".attn_q." in t.name:
            ref = _transformers_unpermute(ref, 9)
        elif ".attn_k." in t.name:
            ref = _transformers_unpermute(ref, 3)
        ours = smol_state[smol.hf_name(t.name)].numpy()
        assert ours.shape == ref.shape, t.name
        assert np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32)), t.name


@pytest.mark.slow  # every tensor of the default model
@needs_default
def test_default_matches_transformers(smol_state, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from functools import lru_cache

    # transformers rebuilds the same name map once per parameter (~8 s); it is a pure function
    monkeypatch.setattr(gguf, "get_tensor_name_map", lru_cache(None)(gguf.get_tensor_name_map))
    monkeypatch.setattr(gguf, "GGUFReader", _PlainArrayReader)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(DEFAULT_GGUF.parent), gguf_file=DEFAULT_GGUF.name, torch_dtype=torch.float32
    )
    ref = model.state_dict()
    names = [n for n in smol_state if not n.startswith("model.layers.")]
    names += [n for n in smol_state for i in (0, 1, 29) if n.startswith(f"model.layers.{i}.")]
    for name in names:
        assert torch.equal(smol_state[name], ref[name]), name


@pytest.mark.slow  # every tensor of the default model
@needs_default
def test_dtype_conversion(smol, smol_state):
    name, t = next((n, t) for n, t in smol.iter_tensors(torch.bfloat16) if "q_proj" in n)
    assert t.dtype == torch.bfloat16
    assert torch.equal(t, smol_state[name].to(torch.bfloat16))


def _write(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q | None]], **meta) -> Path:
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(meta.get("layers", 1))
    w.add_embedding_length(meta.get("hidden", 64))
    w.add_feed_forward_length(meta.get("ff", 128))
    w.add_head_count(meta.get("heads", 4))
    w.add_head_count_kv(meta.get("kv_heads", 2))
    w.add_context_length(256)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    w.add_token_list([f"t{i}" for i in range(meta.get("vocab", 32))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in meta.get("extra", {}).items():
        w.add_string(key, value) if isinstance(value, str) else w.add_float32(key, value)
    for name, (arr, qtype) in tensors.items():
        if qtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16, Q.F32])
def test_synthetic_dequant(tmp_path, qtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    w[3] = 0.0  # all-zero blocks (d == 0)
    path = _write(tmp_path / "m.gguf", "llama", {"blk.0.ffn_up.weight": (w, qtype)})
    f = read_gguf(path)
    assert f.tensor_type("blk.0.ffn_up.weight") == qtype.name
    ours = f.read_tensor("blk.0.ffn_up.weight").numpy()
    raw = quantize(w, qtype)
    ref = dequantize(raw, qtype).astype(np.float32)
    assert ours.shape == (48, 96)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    tol = {Q.Q4_0: 0.5, Q.Q4_1: 0.5, Q.Q8_0: 0.05, Q.BF16: 0.02, Q.F16: 1e-3, Q.F32: 0}[qtype]
    assert np.abs(ours - w).max() <= tol


def _tiny_model(rng, *, heads: int, kv_heads: int, bias: bool, tied: bool) -> dict[str, np.ndarray]:
    hidden, ff, vocab, hd = 64, 128, 32, 64 // heads
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (heads * hd, hidden),
        "blk.0.attn_k.weight": (kv_heads * hd, hidden),
        "blk.0.attn_v.weight": (kv_heads * hd, hidden),
        "blk.0.attn_output.weight": (hidden, heads * hd),
        "blk.0.ffn_gate.weight": (ff, hidden),
        "blk.0.ffn_up.weight": (ff, hidden),
        "blk.0.ffn_down.weight": (hidden, ff),
    }
    if bias:
        for p, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            shapes[f"blk.0.attn_{p}.bias"] = (n * hd,)
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_llama_unpermute_and_names(tmp_path):
    hf = _tiny_model(np.random.default_rng(1), heads=4, kv_heads=2, bias=False, tied=False)
    stored = dict(hf)
    stored["blk.0.attn_q.weight"] = _llamacpp_permute(hf["blk.0.attn_q.weight"], 4)
    stored["blk.0.attn_k.weight"] = _llamacpp_permute(hf["blk.0.attn_k.weight"], 2)
    path = _write(tmp_path / "l.gguf", "llama", {k: (v, None) for k, v in stored.items()})
    f = read_gguf(path)
    cfg = f.hf_config()
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is False
    assert cfg["vocab_size"] == 32 and cfg["rope_theta"] == 500000.0
    state = dict(f.iter_tensors())
    assert set(state) == {f.hf_name(k) for k in hf}
    assert "lm_head.weight" in state
    for k, v in hf.items():
        assert np.array_equal(state[f.hf_name(k)].numpy(), v), k


def test_qwen2_not_permuted_with_bias(tmp_path):
    hf = _tiny_model(np.random.default_rng(2), heads=4, kv_heads=2, bias=True, tied=True)
    path = _write(tmp_path / "q.gguf", "qwen2", {k: (v, None) for k, v in hf.items()})
    f = read_gguf(path)
    cfg = f.hf_config()
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["attention_bias"] is True and cfg["tie_word_embeddings"] is True
    assert ModelConfig.from_hf_dict(cfg).attention_bias
    state = dict(f.iter_tensors())
    assert "model.layers.0.self_attn.q_proj.bias" in state
    for k, v in hf.items():
        assert np.array_equal(state[f.hf_name(k)].numpy(), v), k


def test_rope_scaling(tmp_path):
    extra = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    path = _write(tmp_path / "r.gguf", "llama", {}, extra=extra)
    assert read_gguf(path).hf_config()["rope_scaling"] == {
        "rope_type": "linear", "type": "linear", "factor": 4.0
    }  # fmt: skip


def _llamacpp_rope_factors(dim, base, factor, low=1.0, high=4.0, old=8192):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (rope_freqs)."""
    out = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_freqs(tmp_path, factor):
    freqs = _llamacpp_rope_factors(16, 500000.0, factor)
    path = _write(tmp_path / "r3.gguf", "llama", {"rope_freqs.weight": (freqs, None)})
    f = read_gguf(path)
    assert f.hf_config()["rope_scaling"] == {
        "rope_type": "llama3", "type": "llama3", "factor": factor, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }  # fmt: skip
    assert list(f.iter_tensors()) == []  # rope_freqs is not an HF parameter
    odd = _llamacpp_rope_factors(16, 500000.0, factor, high=2.0)
    path = _write(tmp_path / "odd.gguf", "llama", {"rope_freqs.weight": (odd, None)})
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        read_gguf(path).hf_config()


def test_unsupported_arch(tmp_path):
    path = _write(
        tmp_path / "p.gguf", "gpt2", {"output_norm.weight": (np.ones(64, np.float32), None)}
    )
    f = read_gguf(path)
    with pytest.raises(
        ModelLoadError, match="gpt2.*llama, olmoe, phi3, qwen2, qwen2moe, qwen3, qwen3moe"
    ):
        f.hf_config()
    with pytest.raises(ModelLoadError, match="gpt2"):
        next(f.iter_tensors())


def test_unsupported_tensor_type(tmp_path):
    w = np.ones((4, 64), np.float32)
    path = _write(tmp_path / "u.gguf", "llama", {"blk.0.ffn_up.weight": (w, Q.Q5_0)})
    with pytest.raises(ModelLoadError, match="Q5_0"):
        list(read_gguf(path).iter_tensors())


def test_unknown_tensor_name(tmp_path):
    path = _write(
        tmp_path / "n.gguf",
        "llama",
        {"blk.0.ssm_conv1d.weight": (np.ones((2, 32), np.float32), None)},
    )
    with pytest.raises(ModelLoadError, match="ssm_conv1d"):
        list(read_gguf(path).iter_tensors())


@needs_default
@pytest.mark.parametrize("fraction", [None, 0.9, 0.9999])
def test_truncated_default(tmp_path, fraction):
    data = DEFAULT_GGUF.read_bytes()
    cut = 1 << 20 if fraction is None else int(len(data) * fraction)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        read_gguf(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 10, b"GGUF" + bytes(range(256)) * 8, np.random.default_rng(3).bytes(4096)],
)
def test_garbage_files(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        read_gguf(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")
