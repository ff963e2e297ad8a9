"""Text generation by an lm run's graph (`lowmem-graph generate RUN --prompt ...`): one node the output reads
writes, token by token, through the coupled graph (or another variant the run trained), and the text streams out.

The nodes tokenize differently, so the common ground between them is text: at every step each node tokenizes the
prompt and what has been written so far, the graph runs over it, and the writing node's frozen head at the text's
last token gives the next token. Greedy (temperature 0) or sampled (temperature, top-k, top-p, a seed); it stops at
the node's end-of-text token, after `max_new_tokens`, or at a stop string (the text ends before it, as
lm-evaluation-harness's `until`). No key-value cache: each step is a forward of the whole text, which for the tiny
models and short prompts this serves is cheap, and which keeps every node's view of the text its own tokenizer's.
"""
from __future__ import annotations

import torch

from .errors import UserError


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
               generator: torch.Generator | None) -> int:
    """The token a (V,) row of logits picks: its argmax at temperature 0, else a draw from the softmax at
    `temperature`, kept to the `top_k` most likely and to the smallest set whose mass reaches `top_p`."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        logits[logits < logits.topk(min(top_k, len(logits))).values[-1]] = -float("inf")
    if top_p < 1:
        probs, order = logits.softmax(-1).sort(descending=True)
        outside = probs.cumsum(-1) - probs >= top_p        # the mass before a token already reaches top_p
        logits[order[outside]] = -float("inf")
    return int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))


@torch.no_grad()
def generate(graph, prompt: str, node: str | None = None, variant: str = "coupled", router=None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
             stop: tuple[str, ...] = (), seed: int = 0, on_text=None) -> str:
    """The text the graph writes after `prompt`; `on_text` is called with each new piece as it is decided (a
    piece that might begin a stop string is held back until it cannot)."""
    from . import transfer
    from .nodes import autocast
    from .objectives import final_states

    node = node or graph.reads[0]
    if node not in graph.reads:
        raise UserError(f"node {node!r} does not write: choose one the output reads ({', '.join(graph.reads)})")
    if temperature < 0 or not 0 < top_p <= 1 or (top_k is not None and top_k < 1) or max_new_tokens < 1:
        raise UserError("--temperature must be >= 0, --top-p in (0, 1], --top-k and --max-new-tokens >= 1")
    if not prompt:
        raise UserError("--prompt is empty: give the text to continue")
    if "" in stop:
        raise UserError("--stop is empty: an empty stop string would end the text before it starts")
    writer = graph.nodes[node]
    generator = torch.Generator().manual_seed(seed)
    device = next(graph.parameters()).device
    ids: list[int] = []
    text, shown = "", 0
    base = writer.tokenizer(prompt, add_special_tokens=False)["input_ids"]     # decoded with the prompt, so that a
    head = writer.tokenizer.decode(base, skip_special_tokens=True)             # first word keeps its space
    for _ in range(max_new_tokens):
        batch = graph.collate_text([prompt + text], ["prompt"], keep_start=False)    # over max_length: the latest
        last = int(batch.tokens[node][1][0].sum()) - 1      # on the host
        batch, _ = transfer.arrive(transfer.pack(graph, batch))
        with autocast(device):
            final = final_states(graph, variant, batch, router)[node]
            logits = writer.logits(final[0, last]).float()
        token = next_token(logits, temperature, top_k, top_p, generator)
        if token == writer.tokenizer.eos_token_id:
            break
        ids.append(token)
        text = writer.tokenizer.decode(base + ids, skip_special_tokens=True)[len(head):]
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
            break
        safe = len(text) - max((k for s in stop for k in range(len(s), 0, -1) if text.endswith(s[:k])), default=0)
        if on_text and safe > shown:
            on_text(text[shown:safe])
            shown = safe
    if on_text and len(text) > shown:
        on_text(text[shown:])
    return text


def stream(run_dir, prompt: str, variant: str = "coupled", device: str | None = None, **settings) -> str:
    """`lowmem-graph generate`: the prompt, then the text as it is written, to the terminal."""
    import sys
    from pathlib import Path

    from .lm import load_lm_run

    placed, routers = load_lm_run(Path(run_dir), log=lambda *_: None, progress=False, device=device)
    if variant not in routers:
        raise UserError(f"{run_dir} has no variant {variant!r} (it has {', '.join(routers)})")

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    show(prompt)
    placed.start_steps()
    try:
        text = generate(placed.graph, prompt, variant=variant, router=routers[variant], on_text=show, **settings)
    finally:
        placed.stop_steps()
    show("\n")
    return text
