"""What the causal alignment costs: how much later a source token's state reaches a destination token.

    python bench/causal_delay.py [--graph examples/residual_coupling.yaml] [--task openbook-facts]

Every ordered pair of the graph's nodes over every passage of the text task (tokenized as the lm objective
tokenizes it: each node's prefix, its first max_length tokens): for each destination token of the text, the
source token it reads under the causal rule (align.py: the last source token of the words closed by a space the
destination token has read) against the one it read under the former, leaky rule (the last source token ending
where it ends or before). Prints, per pair: the tokens compared, the mean number of source tokens the read lags
behind the former rule's, the mean number of characters between the end of the source token read and the
destination token's end (both rules), the share of destination tokens that read nothing (zeros), and per source
token how many characters after its own end it becomes visible (once the space closing its word is read; the
former rule: at its end) and the share never visible (the text's last word, closed by no space).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmem_graph.align import align_index, prompt_spans, settled_chars  # noqa: E402
from lowmem_graph.nodes import FrozenNode  # noqa: E402
from lowmem_graph.spec import load_spec  # noqa: E402
from lowmem_graph.text import load_text  # noqa: E402


def lags(src: dict, dst: dict, src_prefix: int, dst_prefix: int, settled: torch.Tensor) -> dict:
    """One pair's figures over a batch of encoded texts (FrozenNode.encode with offsets)."""
    former = settled.new_tensor(range(settled.shape[1])).expand_as(settled)        # limit = the token's own end
    args = (src["offset_mapping"], src["attention_mask"], src_prefix, dst["offset_mapping"], dst["attention_mask"],
            dst_prefix)
    new, old = align_index(*args, settled), align_index(*args, former)
    _, s_end = prompt_spans(src["offset_mapping"], src["attention_mask"], src_prefix)
    _, d_end = prompt_spans(dst["offset_mapping"], dst["attention_mask"], dst_prefix)
    text = d_end > 0

    def chars(index):       # characters between the read source token's end and the destination token's end
        read = index >= 0
        return (d_end - s_end.gather(1, index.clamp_min(0)))[text & read].double()

    valid = s_end > 0
    visible = torch.searchsorted(settled, s_end.clamp_min(1), right=False)   # first c with settled[c] >= end
    seen = valid & (visible < settled.shape[1])
    return {"visible_after": (visible - s_end)[seen].double().mean().item(),
            "never": 1 - seen.sum().item() / valid.sum().item(), "tokens": int(text.sum()), "token_lag": (old - new)[text & (old >= 0)].double().mean().item(),
            "chars_old": chars(old).mean().item(), "chars_new": chars(new).mean().item(),
            "none_old": (old < 0)[text].double().mean().item(), "none_new": (new < 0)[text].double().mean().item()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph", default="examples/residual_coupling.yaml")
    parser.add_argument("--task", default="openbook-facts")
    args = parser.parse_args(argv)
    spec = load_spec(args.graph)
    texts = [t for _, t in load_text(args.task, "all")]
    nodes = {n.name: FrozenNode.load(n, spec.quant, "cpu", spec.max_length) for n in spec.nodes}
    enc = {n: node.encode(texts, offsets=True, keep_start=True) for n, node in nodes.items()}
    settled = settled_chars(texts)
    print(f"{len(texts)} passages of {args.task}, max_length {spec.max_length}")
    print(f"{'source -> destination':<24} {'tokens':>7} {'lag (source tokens)':>20} {'chars behind: former':>21} "
          f"{'causal':>7} {'read nothing: former':>21} {'causal':>7} {'visible after (chars)':>22} {'never':>6}")
    for s in nodes:
        for d in nodes:
            if s != d:
                r = lags(enc[s], enc[d], len(nodes[s].spec.prefix), len(nodes[d].spec.prefix), settled)
                print(f"{s + ' -> ' + d:<24} {r['tokens']:>7} {r['token_lag']:>20.2f} {r['chars_old']:>21.2f} "
                      f"{r['chars_new']:>7.2f} {r['none_old']:>21.1%} {r['none_new']:>7.1%} "
                      f"{r['visible_after']:>22.2f} {r['never']:>6.1%}")


if __name__ == "__main__":
    main()
