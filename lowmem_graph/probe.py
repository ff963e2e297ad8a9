"""What 4-bit costs each node: perplexity and hidden-state error under INT8, INT4 and NF4, against full precision.

The post-training quantisation study in the sources found that a converged model is not necessarily
quantisation-ready: a calibration-free per-group INT4 probe showed the INT4 gap growing while full-precision
perplexity barely moved, with INT8 immune. Every node of a graph is frozen in 4-bit, so each node's cost is worth
seeing before training on it, and a fragile node can be given another format (a node's `quant:` in the spec).

The probe loads a model once in full precision (fp32 on a CPU, bf16 on a GPU) and, for each format, replaces every
decoder linear's weight by its quantise-dequantise round trip (the numbers a quantised model computes with):

* int8: per output row, symmetric, round to nearest (LLM.int8's vector-wise scales, without outliers);
* int4-g128: groups of 128 along the input, symmetric, round to nearest, no calibration (the study's probe);
* nf4: bitsandbytes' NF4 with double quantisation (blocks of 64), what the graph's nodes run.

It reports perplexity on real text (the bundled questions with their answers by default) and its gap to full
precision, and the relative error of the hidden state where the graph reads or injects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .hooks import LayerHook, add_hook, split_hidden
from .loading import decoder_parts

FORMATS = ("full", "int8", "int4-g128", "nf4")
GROUP = 128


def round_trip(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """`w` (out, in) as the format stores and restores it, in w's dtype."""
    x = w.float()
    if fmt == "full":
        return w
    if fmt == "int8":
        scale = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        return ((x / scale).round().clamp(-127, 127) * scale).to(w.dtype)
    if fmt == "int4-g128":
        rows, cols = x.shape
        group = min(GROUP, cols)
        pad = (-cols) % group
        g = torch.nn.functional.pad(x, (0, pad)).view(rows, -1, group)
        scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7
        q = (g / scale).round().clamp(-8, 7) * scale
        return q.view(rows, -1)[:, :cols].to(w.dtype)
    if fmt == "nf4":
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
        return bnbf.dequantize_4bit(packed, state).to(w.dtype)
    raise ValueError(f"unknown format {fmt!r}")


@dataclass
class ProbeRow:
    node: str
    model: str
    format: str
    perplexity: float
    gap_percent: float
    hidden_rel_error: float
    layer: str


def _linears(model) -> list[torch.nn.Linear]:
    """The decoder's linear layers: what a quantised node stores in 4-bit (not the embeddings, not lm_head)."""
    return [m for m in decoder_parts(model)[1].modules() if isinstance(m, torch.nn.Linear)]


class _Keep(LayerHook):
    """Keeps a decoder layer's input or output hidden state (on the host, fp32) at each call."""

    def __init__(self, kind: str, captured: list):
        self.kind, self.captured = kind, captured

    def pre_forward(self, module, *args, **kwargs):
        if self.kind == "input":
            self.captured.append(split_hidden(args, kwargs)[0].detach().float().cpu())
        return args, kwargs

    def post_forward(self, module, output):
        if self.kind == "output":
            self.captured.append((output[0] if isinstance(output, tuple) else output).detach().float().cpu())
        return output


def probe_node(node, texts: list[str], where: tuple[str, int], batch_size: int = 8, progress: bool = True,
               formats=FORMATS) -> list[ProbeRow]:
    """Perplexity of `texts` and the hidden state at `where` (("output", layer) or ("input", layer)) under each
    format. `node`: a FrozenNode loaded in full precision with its lm_head (`logits=True`)."""
    from .progress import progress as bar

    model, tok = node.model, node.tokenizer
    kind, layer = where
    linears = _linears(model)
    originals = [m.weight.data.clone() for m in linears]
    captured = []
    handle = add_hook(node.layers[layer], _Keep(kind, captured))
    reference, rows = None, []
    try:
        for fmt in formats:
            for m, w in zip(linears, originals):
                m.weight.data = round_trip(w, fmt)
            nll, count, hidden = 0.0, 0, []
            starts = range(0, len(texts), batch_size)
            for start in bar(starts, len(starts), f"{node.spec.name} {fmt} batch", progress):
                enc = tok(texts[start:start + batch_size], return_tensors="pt", padding=True,
                          truncation=True, max_length=node.max_length)
                ids, mask = enc["input_ids"].to(node.device), enc["attention_mask"].to(node.device)
                captured.clear()
                with torch.no_grad():
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:],
                                                           reduction="none")
                keep = mask[:, 1:].bool()
                nll += float(losses[keep].sum())
                count += int(keep.sum())
                hidden.append((captured[0], mask.cpu().bool()))
            ppl = math.exp(nll / max(count, 1))
            if reference is None:
                reference = (ppl, hidden)
            error = _relative_error(reference[1], hidden)
            rows.append(ProbeRow(node.spec.name, node.spec.model, fmt, ppl, 100 * (ppl / reference[0] - 1), error,
                                 f"{kind} of decoder layer {layer + 1}/{len(node.layers)}"))
    finally:
        handle.remove()
        for m, w in zip(linears, originals):
            m.weight.data = w
    return rows


def _relative_error(reference, hidden) -> float:
    """||h - h_full|| / ||h_full|| over every real token."""
    num = den = 0.0
    for (ref, mask), (h, _) in zip(reference, hidden):
        num += float(((h - ref)[mask] ** 2).sum())
        den += float((ref[mask] ** 2).sum())
    return math.sqrt(num / den) if den else 0.0


def default_texts(limit: int = 64) -> list[str]:
    """Real text: the bundled ARC-Easy questions, each with its answer, as the graph's prompts read."""
    from .data import load_task
    from .questions import format_prompt

    return [f"{format_prompt(q)} {q.choices[q.label]}" for q in load_task("arc-easy", "validation", limit=limit)]


def read_texts(path, limit: int | None = None) -> list[str]:
    """One text per non-empty line of a UTF-8 file (a line that is not UTF-8 is one error naming it)."""
    from pathlib import Path

    from .questions import _lines
    from .errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    texts = [line.strip() for _, line in _lines(path) if line.strip()]
    if not texts:
        raise UserError(f"{path}: no text in it")
    return texts[:limit] if limit else texts


def write_probe(rows: list[ProbeRow], run_dir, threshold: float) -> list:
    """probe.csv (every row) and probe.md (the table, fragile nodes flagged) in `run_dir`."""
    import csv
    import dataclasses
    from pathlib import Path

    from .files import atomic_file

    run_dir = Path(run_dir)
    records = [dataclasses.asdict(r) for r in rows]
    for r in records:
        r["flagged"] = r["format"] == "nf4" and r["gap_percent"] > threshold
    with atomic_file(run_dir / "probe.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    lines = ["| node | format | perplexity | gap | hidden-state error | at |", "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['node']} | {r['format']} | {r['perplexity']:.3f} | {r['gap_percent']:+.2f}% | "
                     f"{r['hidden_rel_error']:.4f} | {r['layer']} |" + (" **NF4 gap over the threshold**"
                                                                           if r["flagged"] else ""))
    flagged = sorted({r["node"] for r in records if r["flagged"]})
    lines += ["", (f"Nodes whose NF4 perplexity gap exceeds {threshold:g}%: {', '.join(flagged)}; consider "
                   "`quant: bf16` for them in the spec." if flagged
                   else f"No node's NF4 perplexity gap exceeds {threshold:g}%.")]
    with atomic_file(run_dir / "probe.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return [run_dir / "probe.csv", run_dir / "probe.md"]
