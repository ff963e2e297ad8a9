"""The `tiny` preset's models: five small random models of the paper's five architectures, and a tiny GPT-2 (the
residual-coupling source's coding pair is two GPT-2s: `Conv1D` projections, learned positions, no BOS).

Each is built deterministically on first use and cached, with its own tokenizer trained on the bundled
ARC-Easy text. The tokenizers use different algorithms and vocabularies (like the real five do), so
every run exercises cross-tokenizer handling. Random weights: these test plumbing, not accuracy.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

from .errors import UserError
from .files import atomic_dir, remove_stale_temps, seal, sealed

ARCHS = ("llama", "qwen2", "gemma2", "phi3", "mistral")     # the paper's five (the tiny preset)
ALL_ARCHS = (*ARCHS, "gpt2")
_VERSION = 3  # bump when the recipe below changes, so stale caches are rebuilt

# (config class name, width, layers, heads, kv heads, tokenizer kind, vocab size)
_RECIPES = {
    "llama": ("LlamaConfig", 64, 4, 4, 2, "bpe-bytelevel", 384),
    "qwen2": ("Qwen2Config", 48, 4, 4, 2, "bpe-bytelevel", 512),
    "gemma2": ("Gemma2Config", 80, 4, 4, 2, "unigram", 448),
    "phi3": ("Phi3Config", 96, 4, 4, 4, "bpe-metaspace", 320),
    "mistral": ("MistralConfig", 128, 4, 4, 2, "wordpiece", 400),
    "gpt2": ("GPT2Config", 64, 4, 4, 4, "gpt2", 352),
}
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def cache_root() -> Path:
    """Where built tiny models and quantised nodes live (LOWMEM_GRAPH_CACHE overrides)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowmem-graph"
    return Path(os.environ.get("LOWMEM_GRAPH_CACHE", default))


def tiny_folder(arch: str) -> Path:
    """Where the tiny model for `arch` is cached (tiny_path builds it there; the planner only looks)."""
    return cache_root() / "tiny" / f"{arch}-v{_VERSION}"


def tiny_path(arch: str) -> Path:
    """Path of the tiny model for `arch`, building it first if it is not cached yet. A cache like the others: a
    folder damaged, incomplete or not this model's (its key and checksums in checksums.json) is built again."""
    if arch not in _RECIPES:
        raise UserError(f"unknown tiny model 'tiny:{arch}' (choose from {', '.join('tiny:' + a for a in ALL_ARCHS)})")
    path = tiny_folder(arch)
    if not sealed(path, _key(arch), "the tiny model"):
        if path.exists():
            print(f"lowmem-graph: the tiny model {path} is damaged, incomplete or not tiny:{arch}: building it "
                  "again", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)
        _build(arch, path)
    return path


def _key(arch: str) -> dict:
    return {"cache": "tiny", "arch": arch, "version": _VERSION, "recipe": list(_RECIPES[arch])}


def _corpus() -> list[str]:
    from .data import bundled_dir

    lines = []
    for row in map(json.loads, (bundled_dir() / "ARC-Easy-Train.jsonl").read_text().splitlines()):
        lines.append(row["question"]["stem"])
        lines.extend(c["text"] for c in row["question"]["choices"])
    return lines


def _tokenizer(kind: str, vocab: int):
    """A tokenizer of this kind fitted to the bundled corpus, the same on every build: the BPE trainers break ties
    in a fixed order, but the Unigram and WordPiece trainers do not (their vocabularies changed from build to build),
    so those two vocabularies are built here from corpus counts, ties broken by the text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "gpt2":      # GPT-2's own shape: byte-level BPE, one special token for end, padding, unknown
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_corpus(), trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")
    if kind == "bpe-bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_corpus(), trainer)
    elif kind == "bpe-metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False)
        tok.train_from_iterator(_corpus(), trainer)
    elif kind == "unigram":
        normalizer, pre = normalizers.NFKC(), pre_tokenizers.Metaspace()
        chars, words = _counts(_corpus(), normalizer, pre)
        total = sum(words.values()) + sum(chars.values())
        pieces = [(t, 0.0) for t in SPECIALS] + [(c, math.log(n / total) - 10) for c, n in _ranked(chars)]
        pieces += [(w, math.log(n / total)) for w, n in _ranked(words) if len(w) > 1][:vocab - len(pieces)]
        tok = Tokenizer(models.Unigram(pieces, unk_id=SPECIALS.index("<unk>"), byte_fallback=False))
        tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.Metaspace()
    else:  # wordpiece
        normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        chars, words = _counts(_corpus(), normalizer, pre)
        tokens = SPECIALS + [c for c, _ in _ranked(chars)] + ["##" + c for c, _ in _ranked(chars)]
        tokens += [w for w, _ in _ranked(words) if len(w) > 1][:vocab - len(tokens)]
        tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
        tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def _counts(lines, normalizer, pre_tokenizer):
    """(character counts, word counts) of the corpus as this tokenizer's normalizer and pre-tokenizer see it."""
    from collections import Counter

    chars, words = Counter(), Counter()
    for line in lines:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            words[word] += 1
            chars.update(word)
    return chars, words


def _ranked(counts):
    """Most frequent first, ties in text order: the same list on every build."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _build(arch: str, path: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    cls, width, layers, heads, kv, kind, vocab = _RECIPES[arch]
    tokenizer = _tokenizer(kind, vocab)
    extra = {"head_dim": width // heads, "sliding_window": 64} if arch == "gemma2" else {}
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=width, n_layer=layers, n_head=heads,
                                         n_positions=1024, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    else:
        config = getattr(transformers, cls)(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **extra)
    with torch.random.fork_rng():       # deterministic weights without disturbing the caller's RNG
        torch.manual_seed(ALL_ARCHS.index(arch))
        model = AutoModelForCausalLM.from_config(config)
    remove_stale_temps(path.parent)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        seal(tmp, _key(arch))
