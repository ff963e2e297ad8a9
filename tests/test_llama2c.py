"""The llama2.c converter must reproduce llama2.c itself: checked against small reference versions of run.c's
encode and forward written here from its algorithm, not from the converter."""

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lowmem_graph.errors import UserError
from lowmem_graph.llama2c import convert_llama2c, is_llama2c_checkpoint

SENTENCES = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine.",
    "One day, Tom saw a big, red ball in the park.\n\"Can I play?\" he asked his mom.",
    "Which of these is a source of light? (A) the Moon (B) a mirror (C) the Sun (D) a rock. Answer: C",
    "A car travels 120 km in 2.5 hours; its speed is 48 km/h, i.e. about 13.3 m/s at 25°C.",
    "Zoë's café sells crème brûlée for €3 — wow!  Two  spaces 🙂",
]


def shared_dir():
    """The shared data folder: LOWMEM_GRAPH_SHARED, else `shared` beside the repo root."""
    return Path(os.environ.get("LOWMEM_GRAPH_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="module")
def stories():
    folder = shared_dir() / "data" / "models" / "stories260K"
    if not (folder / "stories260K.bin").is_file() or not (folder / "tok512.bin").is_file():
        pytest.skip(f"stories260K not found in {folder}")
    return folder


@pytest.fixture(scope="module")
def converted(stories, tmp_path_factory):
    return convert_llama2c(stories / "stories260K.bin", tmp_path_factory.mktemp("conv") / "stories260K")


def read_llama2c_tokenizer(path, vocab_size):
    data = path.read_bytes()
    pieces, scores, off = [], [], 4
    for _ in range(vocab_size):
        score, n = struct.unpack_from("<fi", data, off)
        pieces.append(data[off + 8:off + 8 + n].decode("utf-8"))
        scores.append(score)
        off += 8 + n
    return pieces, scores


def llama2c_encode(text, pieces, scores):
    """run.c's encode with bos: dummy space, one token per character (else UTF-8 bytes at id byte+3),
    then merge the adjacent pair whose concatenation scores highest, leftmost on ties, until none is in the vocab."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [lookup[" "]] if text else []
    for ch in text:
        tokens += [lookup[ch]] if ch in lookup else [b + 3 for b in ch.encode("utf-8")]
    while True:
        best = None
        for i in range(len(tokens) - 1):
            j = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if j is not None and (best is None or scores[j] > scores[best[1]]):
                best = (i, j)
        if best is None:
            return [1] + tokens
        tokens[best[0]:best[0] + 2] = [best[1]]


def llama2c_forward(path, tokens):
    """run.c's forward for every position at once, in float64: logits (len(tokens), vocab)."""
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack_from("<7i", raw)
    assert vocab > 0, "reference only handles a shared classifier"
    hs = dim // n_heads
    kv_dim = n_kv_heads * hs
    w = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64))
    sizes = [vocab * dim, n_layers * dim, n_layers * dim * dim, n_layers * kv_dim * dim, n_layers * kv_dim * dim,
             n_layers * dim * dim, n_layers * dim, n_layers * hidden * dim, n_layers * dim * hidden,
             n_layers * hidden * dim, dim, seq_len * hs // 2, seq_len * hs // 2]
    assert sum(sizes) == w.numel()
    emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, fr, fi = w.split(sizes)
    emb = emb.view(vocab, dim)
    wq, wo = wq.view(n_layers, dim, dim), wo.view(n_layers, dim, dim)
    wk, wv = wk.view(n_layers, kv_dim, dim), wv.view(n_layers, kv_dim, dim)
    w1, w3, w2 = w1.view(n_layers, hidden, dim), w3.view(n_layers, hidden, dim), w2.view(n_layers, dim, hidden)

    n = len(tokens)
    # run.c's RoPE: rotate each pair (2i, 2i+1) of a head by pos / 10000^(2i/head_size), as a complex product.
    pos_freq = torch.arange(n, dtype=torch.float64)[:, None] / 10000 ** (torch.arange(0, hs, 2) / hs)
    rot = torch.polar(torch.ones_like(pos_freq), pos_freq)
    stored = torch.complex(fr.view(seq_len, hs // 2)[:n], fi.view(seq_len, hs // 2)[:n])
    torch.testing.assert_close(stored, rot, atol=1e-5, rtol=0)  # the file's tables are theta 10000

    def rmsnorm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * weight

    def rope(x, heads):
        pairs = torch.view_as_complex(x.reshape(n, heads, hs // 2, 2).contiguous())
        return torch.view_as_real(pairs * stored[:, None, :]).reshape(n, heads, hs)

    x = emb[torch.tensor(tokens)]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for l in range(n_layers):
        xb = rmsnorm(x, rms_att.view(n_layers, dim)[l])
        q = rope(xb @ wq[l].T, n_heads)
        k = rope(xb @ wk[l].T, n_kv_heads).repeat_interleave(n_heads // n_kv_heads, dim=1)
        v = (xb @ wv[l].T).view(n, n_kv_heads, hs).repeat_interleave(n_heads // n_kv_heads, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / hs**0.5 + mask
        out = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(n, dim)
        x = x + out @ wo[l].T
        xb = rmsnorm(x, rms_ffn.view(n_layers, dim)[l])
        x = x + (torch.nn.functional.silu(xb @ w1[l].T) * (xb @ w3[l].T)) @ w2[l].T
    return rmsnorm(x, rms_final) @ emb.T


def test_detects_checkpoint(stories, tmp_path):
    assert is_llama2c_checkpoint(stories / "stories260K.bin")
    assert not is_llama2c_checkpoint(stories / "tok512.bin")
    (tmp_path / "dir.bin").mkdir()
    assert not is_llama2c_checkpoint(tmp_path / "dir.bin")


def test_tokenizer_matches_llama2c_encode(stories, converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    pieces, scores = read_llama2c_tokenizer(stories / "tok512.bin", 512)
    for text in SENTENCES:
        assert tok(text).input_ids == llama2c_encode(text, pieces, scores), text
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "</s>")
    text = SENTENCES[0]
    offsets = tok(text, return_offsets_mapping=True, add_special_tokens=False).offset_mapping
    assert "".join(text[a:b] for a, b in offsets) == text


def test_logits_match_llama2c_forward(stories, converted):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    pieces, scores = read_llama2c_tokenizer(stories / "tok512.bin", 512)
    tokens = llama2c_encode("Once upon a time, there was a little dog named Max who liked to run.", pieces, scores)
    assert 15 <= len(tokens) <= 30
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    expected = llama2c_forward(stories / "stories260K.bin", tokens)
    torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=0)


def test_truncated_checkpoint_is_a_user_error(stories, tmp_path):
    bad = tmp_path / "stories260K.bin"
    bad.write_bytes((stories / "stories260K.bin").read_bytes()[:-100])
    (tmp_path / "tok512.bin").write_bytes((stories / "tok512.bin").read_bytes())
    assert not is_llama2c_checkpoint(bad)
    with pytest.raises(UserError, match="stories260K.bin"):
        convert_llama2c(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_is_a_user_error(stories, tmp_path):
    ckpt = tmp_path / "model.bin"
    ckpt.write_bytes((stories / "stories260K.bin").read_bytes())
    with pytest.raises(UserError, match="tok512.bin.*tokenizer.bin"):
        convert_llama2c(ckpt, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_separate_classifier(stories, converted, tmp_path):
    """A negative vocab_size in the header means a wcls matrix follows; here a copy of the embedding."""
    from transformers import LlamaForCausalLM

    raw = (stories / "stories260K.bin").read_bytes()
    header = list(struct.unpack_from("<7i", raw))
    header[5] = -header[5]
    (tmp_path / "unshared.bin").write_bytes(struct.pack("<7i", *header) + raw[28:] + raw[28:28 + 4 * 512 * 64])
    (tmp_path / "tok512.bin").write_bytes((stories / "tok512.bin").read_bytes())
    out = convert_llama2c(tmp_path / "unshared.bin", tmp_path / "out")
    unshared, shared = LlamaForCausalLM.from_pretrained(out), LlamaForCausalLM.from_pretrained(converted)
    assert not unshared.config.tie_word_embeddings and shared.config.tie_word_embeddings
    tokens = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        torch.testing.assert_close(unshared(tokens).logits, shared(tokens).logits)


def test_a_converted_cache_entry_is_sealed_before_it_appears(stories, tmp_path, monkeypatch):
    """A cache entry is sealed inside its temporary folder, then renamed into place: at the rename, and so for any
    reader who sees the folder at all, it is whole and sealed under its key (sealing after the rename left a moment
    when a reader found it unsealed, took it for damaged and deleted it)."""
    from lowmem_graph import files

    key = {"cache": "llama2c", "sha256": files.file_sha256(stories / "stories260K.bin")}
    out = tmp_path / "stories260K"
    seen = []
    real = os.replace

    def watched(src, dst):
        if Path(dst) == out:
            seen.append(files.sealed(Path(src), key, "the converted llama2.c model"))
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", watched)
    assert convert_llama2c(stories / "stories260K.bin", out, key=key) == out
    assert seen == [True]
    assert files.sealed(out, key, "the converted llama2.c model")
    assert not files.sealed(out, {**key, "sha256": "0" * 64}, "the converted llama2.c model")
