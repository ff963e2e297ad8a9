"""Convert llama2.c checkpoints (legacy "version 0" .bin) and their tokenizer to a Hugging Face Llama folder.

Karpathy's tiny story models (stories260K/15M/42M/110M) ship only in this format; converting them once
lets the rest of the project treat them like any other Hugging Face model.
"""

import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import atomic_dir, seal

_HEADER = struct.Struct("<7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2; the export writes bos/eos as "\n<s>\n" and "\n</s>\n"


def _read_header(path):
    """Parse and sanity-check the header, so a wrong file fails here rather than as garbage weights."""
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise UserError(f"{path}: too short for a llama2.c checkpoint header")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = _HEADER.unpack(raw)
    shared = vocab > 0  # a negative vocab_size means a separate classifier follows
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0:
        raise UserError(f"{path}: header has non-positive sizes; not a llama2.c version-0 checkpoint")
    if dim % n_heads or (dim // n_heads) % 2 or n_heads % n_kv_heads:
        raise UserError(f"{path}: header sizes are inconsistent (dim {dim}, heads {n_heads}, kv heads {n_kv_heads})")
    h = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
             vocab=vocab, seq_len=seq_len, shared=shared)
    expected = _HEADER.size + 4 * sum(n for _, n in _layout(h))
    actual = os.path.getsize(path)
    if actual != expected:
        raise UserError(f"{path}: {actual} bytes but its header implies {expected}; truncated or not llama2.c version 0")
    return h


def _layout(h):
    """(name, element count) of each tensor in file order, as llama2.c's legacy export writes them."""
    dim, hidden, L, vocab = h["dim"], h["hidden"], h["n_layers"], h["vocab"]
    head_size = dim // h["n_heads"]
    kv_dim = h["n_kv_heads"] * head_size
    parts = [("tok", vocab * dim), ("rms_att", L * dim), ("wq", L * dim * dim), ("wk", L * kv_dim * dim),
             ("wv", L * kv_dim * dim), ("wo", L * dim * dim), ("rms_ffn", L * dim), ("w1", L * hidden * dim),
             ("w2", L * dim * hidden), ("w3", L * hidden * dim), ("rms_final", dim),
             ("freq_real", h["seq_len"] * head_size // 2), ("freq_imag", h["seq_len"] * head_size // 2)]
    return parts if h["shared"] else parts + [("wcls", vocab * dim)]


def is_llama2c_checkpoint(path) -> bool:
    """True for a .bin file whose header and size fit the llama2.c version-0 layout."""
    path = Path(path)
    if path.suffix != ".bin" or not path.is_file():
        return False
    try:
        _read_header(path)
    except (UserError, OSError):
        return False
    return True


def _permute(w, n_heads):
    """llama2.c rotates pairs (2i, 2i+1) of each head; HF's rotate_half pairs (i, i + d/2): reorder rows."""
    *lead, rows, cols = w.shape
    return w.reshape(*lead, n_heads, rows // n_heads // 2, 2, cols).transpose(-3, -2).reshape(w.shape)


def _state_dict(path, h):
    """The file's tensors under LlamaForCausalLM's names, q/k rows reordered for HF's RoPE."""
    names, sizes = zip(*_layout(h))
    flat = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=_HEADER.size).astype(np.float32, copy=False))
    t = dict(zip(names, flat.split(list(sizes))))
    dim, hidden, L, vocab = h["dim"], h["hidden"], h["n_layers"], h["vocab"]
    kv_dim = h["n_kv_heads"] * dim // h["n_heads"]
    sd = {"model.embed_tokens.weight": t["tok"].view(vocab, dim), "model.norm.weight": t["rms_final"]}
    per_layer = {
        "input_layernorm.weight": t["rms_att"].view(L, dim),
        "self_attn.q_proj.weight": _permute(t["wq"].view(L, dim, dim), h["n_heads"]),
        "self_attn.k_proj.weight": _permute(t["wk"].view(L, kv_dim, dim), h["n_kv_heads"]),
        "self_attn.v_proj.weight": t["wv"].view(L, kv_dim, dim),
        "self_attn.o_proj.weight": t["wo"].view(L, dim, dim),
        "post_attention_layernorm.weight": t["rms_ffn"].view(L, dim),
        "mlp.gate_proj.weight": t["w1"].view(L, hidden, dim),
        "mlp.down_proj.weight": t["w2"].view(L, dim, hidden),
        "mlp.up_proj.weight": t["w3"].view(L, hidden, dim),
    }
    for i in range(L):
        for name, w in per_layer.items():
            sd[f"model.layers.{i}.{name}"] = w[i]
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if h["shared"] else t["wcls"].view(vocab, dim)
    return sd


def _build_model(path, h):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=h["vocab"], hidden_size=h["dim"], intermediate_size=h["hidden"],
        num_hidden_layers=h["n_layers"], num_attention_heads=h["n_heads"], num_key_value_heads=h["n_kv_heads"],
        max_position_embeddings=h["seq_len"], hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=h["shared"], bos_token_id=1, eos_token_id=2, dtype=torch.float32,
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(_state_dict(path, h), strict=True)
    return model


def _read_tokenizer(path, vocab_size):
    """(pieces, scores) from llama2.c's tokenizer.bin: int32 max_len, then per token f32 score, i32 len, bytes."""
    data = Path(path).read_bytes()
    pieces, scores, off = [], [], 4
    try:
        for _ in range(vocab_size):
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or off + n > len(data):
                raise struct.error("token runs past the end")
            pieces.append(data[off:off + n].decode("utf-8"))
            scores.append(score)
            off += n
    except (struct.error, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a llama2.c tokenizer with {vocab_size} tokens ({e})") from None
    if off != len(data):
        raise UserError(f"{path}: {len(data) - off} bytes left after {vocab_size} tokens; wrong tokenizer for this model?")
    return pieces, scores


def _build_tokenizer(path, vocab_size, seq_len):
    """A fast BPE that reproduces llama2.c's encode: merge the adjacent pair whose result scores highest."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces, scores = _read_tokenizer(path, vocab_size)
    pieces = list(_SPECIALS) + [p.replace(" ", "▁") for p in pieces[len(_SPECIALS):]]
    vocab = {p: i for i, p in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise UserError(f"{path}: duplicate tokens; not a llama2.c tokenizer")
    # llama2.c merges any pair whose concatenation is in the vocab, so every split of a token is a merge,
    # ranked by the merged token's score.
    merges = []
    for i in sorted(range(len(_SPECIALS), vocab_size), key=lambda i: -scores[i]):
        p = pieces[i]
        if len(p) < 2 or _BYTE_PIECE.fullmatch(p):
            continue
        merges += [(p[:k], p[k:]) for k in range(1, len(p))
                   if vocab.get(p[:k], 0) >= len(_SPECIALS) and vocab.get(p[k:], 0) >= len(_SPECIALS)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", add_bos_token=True, add_eos_token=False,
                                   model_max_length=seq_len)


def convert_llama2c(checkpoint_path, out_dir, tokenizer_path=None, key: dict | None = None) -> Path:
    """Write a fp32 LlamaForCausalLM and its fast tokenizer to out_dir, all or nothing. `key`: a cache entry's, with
    which the folder is sealed (files.seal) before its rename: a reader never sees it unsealed."""
    checkpoint_path, out_dir = Path(checkpoint_path), Path(out_dir)
    if not checkpoint_path.is_file():
        raise UserError(f"{checkpoint_path}: no such checkpoint file")
    h = _read_header(checkpoint_path)
    if tokenizer_path is None:
        candidates = [checkpoint_path.with_name(f"tok{h['vocab']}.bin"), checkpoint_path.with_name("tokenizer.bin")]
        tokenizer_path = next((p for p in candidates if p.is_file()), None)
        if tokenizer_path is None:
            raise UserError(f"no llama2.c tokenizer found; looked for {' and '.join(map(str, candidates))}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty; remove it or pick another folder")
    tokenizer = _build_tokenizer(tokenizer_path, h["vocab"], h["seq_len"])
    model = _build_model(checkpoint_path, h)

    if out_dir.is_dir():
        out_dir.rmdir()                 # empty (checked above): the finished folder takes its place
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if key is not None:
            seal(tmp, key)
    return out_dir
