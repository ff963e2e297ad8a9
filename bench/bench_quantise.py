"""A node's first run: quantising it to NF4 for the node cache, the old way (from_pretrained quantises the whole
model, save_pretrained writes it) against module by module (lowmem_graph/quantise.py), in fresh processes.

Builds a Llama-shaped checkpoint in bf16 (as hub models ship) scaled to a few hundred MB, then runs each way in its
own process on the CPU and records its peak resident memory above the process after its imports (anonymous
memory, what the run holds, sampled every 5 ms from /proc/self/status; and all of it, page cache of mapped files
included, from the same samples), its process CPU time and wall time, and checks the two copies are the same bytes.
Writes bench/results/quantise-cpu.md.

    python bench/bench_quantise.py [--width 2048 --layers 12 --vocab 8000] [--out bench/results]
"""
from __future__ import annotations

import argparse
import filecmp
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(folder: Path, width: int, layers: int, vocab: int) -> int:
    """A random Llama of this shape saved in bf16 with a tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowmem_graph.tiny import tiny_path

    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=width // 128, num_key_value_heads=width // 512,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_path("llama")).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def child(way: str, source: str, out: str) -> dict:
    """One way, in this process: the figures as JSON on stdout."""
    import resource
    import threading
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem_graph import quantise
    from lowmem_graph.loading import _save_atomically, load_config

    torch.set_num_threads(1)

    def status():
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["RssAnon"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024

    base, peak, done = status(), list(status()), threading.Event()

    def sample():
        while not done.wait(0.005):
            now = status()
            peak[0], peak[1] = max(peak[0], now[0]), max(peak[1], now[1])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    wall, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
    compute, key = torch.float32, {"cache": "nodes"}
    tokenizer = AutoTokenizer.from_pretrained(source)
    if way == "old":
        model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quantise.quantiser_config(compute),
                                                     dtype=compute, device_map={"": "cpu"})
        _save_atomically(model, tokenizer, Path(out), key)
    else:
        config, _, _ = load_config(source)
        assert quantise.save_quantised(source, True, None, config, compute, torch.device("cpu"), Path(out), key,
                                       tokenizer)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    done.set()
    sampler.join()
    return {"anon": peak[0] - base[0], "rss": peak[1] - base[1], "cpu": usage.ru_utime + usage.ru_stime - cpu,
            "wall": time.perf_counter() - wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        params = build(scratch / "model", args.width, args.layers, args.vocab)
        size = (scratch / "model" / "model.safetensors").stat().st_size
        rows = {}
        for way in ("old", "by-module"):
            run = subprocess.run([sys.executable, __file__, "--child", way, str(scratch / "model"),
                                  str(scratch / way)], capture_output=True, text=True, check=True)
            rows[way] = json.loads(run.stdout.strip().splitlines()[-1])
        same = all(filecmp.cmp(scratch / "old" / f.name, f, shallow=False) for f in (scratch / "by-module").iterdir())
        nf4 = (scratch / "old" / "model.safetensors").stat().st_size
    gib = 2 ** 30
    lines = [f"# First run: quantising a node to NF4 on the CPU (bench/bench_quantise.py)", "",
             f"A random Llama, width {args.width}, {args.layers} layers, vocab {args.vocab}: {params / 1e6:.0f}M "
             f"parameters, checkpoint {size / gib:.2f} GiB in bf16, quantised for fp32 compute (a CPU run), NF4 copy "
             f"{nf4 / gib:.2f} GiB. One torch thread; each way in a fresh process; peaks above the process after its "
             "imports, sampled every 5 ms.", "",
             "| way | peak anonymous memory | peak resident (with mapped pages) | CPU time | wall |",
             "|---|---|---|---|---|"]
    for way, r in rows.items():
        lines.append(f"| {way} | {r['anon'] / gib:.2f} GiB | {r['rss'] / gib:.2f} GiB | {r['cpu']:.1f} s | "
                     f"{r['wall']:.1f} s |")
    lines += ["", f"The two copies are the same bytes: {same}."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantise-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
