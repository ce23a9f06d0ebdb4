"""Tiny GGUF tokenizers written from scratch: a SentencePiece ("llama") one and a llama-3-style
byte-level BPE one."""

from __future__ import annotations

from pathlib import Path

import gguf

# SentencePiece ("llama") GGUF: merges come from scores; bytes fall back to <0xNN>.
SPM_PIECES = [  # (piece, score): the higher the score, the earlier the merge
    ("▁", -100.0), ("h", -100.0), ("e", -100.0), ("l", -100.0), ("o", -100.0),
    ("w", -100.0), ("r", -100.0), ("d", -100.0),
    ("ll", -1.0), ("▁h", -2.0), ("▁he", -3.0), ("llo", -4.0), ("▁hello", -5.0),
    ("▁w", -6.0), ("or", -7.0), ("ld", -8.0), ("▁wor", -9.0), ("▁world", -10.0),
]  # fmt: skip


def write_spm_gguf(path: Path, *, add_space_prefix: bool = True) -> dict[str, int]:
    """A SentencePiece GGUF of SPM_PIECES, bytes and a few specials; returns token -> id."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for piece, score in SPM_PIECES:
        tokens.append(piece)
        types.append(1)
        scores.append(score)
    tokens.append("<tool>")
    types.append(4)
    scores.append(0.0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {t: i for i, t in enumerate(tokens)}


def write_byte_level_gguf(path: Path) -> list[str]:
    """A llama-3-style byte-level BPE GGUF with a tiny vocabulary; returns its tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + ["Ġt", "he", "Ġthe", "<|begin_of_text|>", "<|eot_id|>"]
    types = [1] * (len(chars) + 3) + [3, 3]
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens
