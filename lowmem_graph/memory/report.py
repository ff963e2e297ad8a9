"""Memory a run uses, measured the same way everywhere: host RSS (psutil) and CUDA peaks (torch), and, on any
device, the bytes of tensors a block of code allocates (`LiveBytes`: how the planner's constants are checked on
a CPU, where torch keeps no allocator statistics); and memory as the tables print it, a plan's too (`format_plan`)."""
from __future__ import annotations

import ctypes
import re
import resource
import weakref

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

KiB, MiB, GiB = 2 ** 10, 2 ** 20, 2 ** 30
MB = MiB        # the metrics' "_mb" keys are MiB


def format_mib(n: int | float) -> str:
    """Bytes as MiB the way every table here prints them: thousands separated, two decimals below 10 MiB."""
    return f"{n / MiB:,.0f} MiB" if n >= 10 * MiB or n == 0 else f"{n / MiB:.2f} MiB"


def format_gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


def peak_rss_mib() -> float:
    """The process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def outside_torch_bytes(device) -> int:
    """Device memory in use outside torch's caching allocator (the CUDA context, library handles, loaded kernels),
    read from the driver."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def others_on_the_gpu() -> int | None:
    """Bytes in use on this machine's one GPU before this process makes its CUDA context: other programs (a desktop,
    another run) and the driver's reserve, which cudaMemGetInfo counts as used too, so a peak measured through it
    includes them. Read through NVML, which makes no context. None where NVML is missing, or with several GPUs
    (which one this process will use is not known from NVML's numbering)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count, handle = ctypes.c_uint(), ctypes.c_void_p()
        memory = (ctypes.c_ulonglong * 3)()         # nvmlMemory_t: total, free, used
        if (nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0 or count.value != 1
                or nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) != 0
                or nvml.nvmlDeviceGetMemoryInfo(handle, memory) != 0):
            return None
        return int(memory[2])
    finally:
        nvml.nvmlShutdown()


def device_peaks(device, outside: int = 0) -> dict[str, float]:
    """torch's peaks since the last reset and the whole device's: what is in use outside torch's allocator (the
    larger of `outside`, read earlier, and now: kernels and handles load lazily) plus the peak reserved, in MiB."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    outside = max(outside, outside_torch_bytes(device))
    reserved = torch.cuda.max_memory_reserved(device)
    return {"measured_peak_allocated_mib": torch.cuda.max_memory_allocated(device) / MiB,
            "measured_peak_reserved_mib": reserved / MiB, "measured_context_mib": outside / MiB,
            "measured_peak_mib": (outside + reserved) / MiB}


def peak_during(fn, device) -> int:
    """Bytes `fn()` allocates at its peak above what was allocated before: torch's CUDA statistics on a GPU,
    `LiveBytes` elsewhere."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveBytes() as live:
        fn()
    return live.peak


def memory_snapshot(device: torch.device | str | None = None, others: tuple = ()) -> dict[str, float]:
    """Host RSS now and, on CUDA, the peak allocated/reserved bytes since the last reset, in MiB; `others`: the
    other cards a run computes on (nodes on devices of their own), each's peak allocated as "cuda:N_peak_..."."""
    snap = {"host_rss_mb": psutil.Process().memory_info().rss / MB}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        snap["cuda_allocated_mb"] = torch.cuda.memory_allocated(device) / MB
        snap["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
        snap["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / MB
    for other in others:
        snap[f"{other}_peak_allocated_mb"] = torch.cuda.max_memory_allocated(other) / MB
    return snap


def format_snapshot(snap: dict[str, float]) -> str:
    text = f"host RSS {snap['host_rss_mb']:.0f} MiB"
    if "cuda_peak_allocated_mb" in snap:
        text += (f", GPU peak {snap['cuda_peak_allocated_mb']:.0f} MiB allocated / "
                 f"{snap['cuda_peak_reserved_mb']:.0f} MiB reserved")
    for key, value in snap.items():
        if key.startswith("cuda:") and key.endswith("_peak_allocated_mb"):
            text += f", {key.split('_')[0]} peak {value:.0f} MiB allocated"
    return text


def out_of_memory_message(error: BaseException, plan=None) -> str:
    """One line for a CUDA OOM: what the plan predicted (for the card that ran out, when the plan spans several:
    torch names it as "GPU N") and what to change."""
    first = str(error).splitlines()[0] if str(error) else "CUDA out of memory"
    predicted = "no --gpu-mem plan was applied; "
    if plan is not None:
        peak, budget, where = plan.peak, plan.budget, ""
        card = re.search(r"\bGPU (\d+)\b", str(error))
        device = f"cuda:{card.group(1)}" if card else None
        if plan.devices and device in plan.devices:
            peak, budget, where = plan.devices[device]["peak"], plan.devices[device]["budget"], f" on {device}"
        predicted = f"the plan predicted a peak of {peak / GiB:.2f} GiB within {budget / GiB:.2f} GiB{where}; "
    return (f"CUDA out of memory ({first[:160]}); {predicted}try a smaller --gpu-mem (the plan then keeps less "
            "resident and streams more), a smaller --batch-size, or keep the prefix cache on")


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the block that are still alive (`live`), and the most that were
    alive at once (`peak`; `reset_peak()` starts a new one). A storage counts from the op that made it until it is
    freed; views and in-place results share their input's storage and count nothing. Storages made before the
    block (weights, inputs) never count, so `live` at the end is what the block left behind."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.live_at_reset = 0
        self._sizes: dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak = self.live_at_reset = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._sizes:
                continue
            self._sizes[key] = storage.nbytes()
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


# --- the table ---------------------------------------------------------------------------------------------------
_WHY = {
    "resident_weights": "resident layer groups + final norms",
    "stream_slots": "device slots for streamed groups",
    "checkpoint_inputs": "saved group inputs, masks, cached inputs (2 micro-batches; layer-major: the batch)",
    "recompute": "one group recomputed in backward (SDPA, O(seq) attention)",
    "head_activations": "final states, readouts, output node (+ grads)",
    "trainable+optimizer": "fp32 params + grads + AdamW states, 16 B/param",
    "workspace": "quantised matmuls' transients (NF4: a dequantised linear; int8: + input, product)",
    "cuda_context": "fixed allowance: CUDA context, cuBLAS, allocator slack",
    "eval_activations": "cached inputs, final states and readouts kept; one layer at work",
    "frozen_nodes": "all five models, NF4 layers + bf16 embeddings, no lm_head",
    "slab_being_built": "the largest pinned slab, while its tensors are copied in",
    "prefix_cache_rows": "a shard being written (x2); two steps' cached rows, pinned in power-of-two blocks",
    "runtime": "fixed allowance: Python, torch, CUDA libraries",
    "kept_activations": "layer-major: every micro-batch's group inputs and gradients, pinned",
    "disk_staging": "two pinned buffers per streamer its disk groups are read into",
}


EPOCH_EXAMPLES = 1000      # the epoch `plan` prices: per this many training examples (and as many evaluated)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def format_timing(plan) -> list[str]:
    """The plan's predicted times (memory/cost.py) on its device profile, the bottleneck, and the runners-up."""
    t, device = plan.timing, plan.device
    if t is None:
        return []
    p = t.parts
    copies = (f"copies {_ms(p['copies'])} ({t.copied_bytes / 1e9:.2f} GB, "
              f"{'hidden behind compute' if t.overlapped else 'not overlapped'})" if t.copied_bytes else "no copies")
    copies += f"; disk reads {_ms(p['disk'])} ({t.disk_bytes / 1e9:.2f} GB)" if t.disk_bytes else ""
    epoch = t.epoch(EPOCH_EXAMPLES, plan.batch, EPOCH_EXAMPLES)
    # the frozen pass's resident groups on disk: read once per pass, over the training and the evaluation set
    once = 2 * sum(g.bytes for placed in plan.frozen.values() for g in placed.groups if g.disk and g.resident)
    first = t.frozen_batch * -(-2 * EPOCH_EXAMPLES // plan.batch) + once / device.disk_read
    origin = f"; profile read from {device.origin}" if device.origin else ""
    lines = [f"predicted time on {device.name} ({device.source or 'measured'}{origin}); predictions, not measurements:",
             f"  {'training step':<20} {_ms(t.step):>12}  matmuls {_ms(p['gemm'])} (recompute {_ms(p['recompute'])}"
             f" of them), dequantisation {_ms(p['dequant'])}, launches {_ms(p['launch'])}, head and optimizer "
             f"{_ms(p['head+optimizer'])}; {copies}",
             f"  {'bottleneck':<20} {t.bottleneck:>12}",
             f"  {'evaluation batch':<20} {_ms(t.eval_batch):>12}  {plan.batch} examples at micro-batch "
             f"{plan.micro_batch}",
             f"  {'frozen pass':<20} {_ms(t.frozen_batch):>12}  per {plan.batch} examples (once, then cached)",
             f"  {'epoch':<20} {_ms(epoch):>12}  {EPOCH_EXAMPLES:,} examples trained and {EPOCH_EXAMPLES:,} "
             f"evaluated (first epoch: + {_ms(first)} frozen pass"
             + (f", of it {_ms(once / device.disk_read)} reading {once / 1e9:.1f} GB of resident groups from disk"
                if once else "") + ")"]
    if plan.runners_up:
        lines.append("  runners-up (the fastest of each other kind that fits), and why each lost:")
        lines += [f"    {r['kind']}: {_ms(r['timing'].step)} ({r['timing'].why_slower(t)})" for r in plan.runners_up]
    return lines


def _spans(groups) -> str:
    """Layer ranges of consecutive groups, merged: '0-39, 44-47'."""
    spans = []
    for g in groups:
        if spans and spans[-1][1] == g.first:
            spans[-1][1] = g.last
        else:
            spans.append([g.first, g.last])
    return ", ".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in spans)


def format_plan(plan, spec) -> str:
    """A memory plan (memory/search.py) as the table `lowmem-graph plan` prints."""
    own = "".join(f"; {n.name} {n.quant}" for n in spec.nodes if n.quant not in (None, spec.quant))
    lines = [f"plan for graph {spec.name} ({spec.quant}{own}): budget {format_gib(plan.budget)}, batch {plan.batch} "
             f"(micro-batch {plan.micro_batch} x {plan.accumulation} accumulation), seq {plan.seq}"
             + (f" (the spec truncates at max_length {spec.max_length})" if plan.seq > spec.max_length else ""), ""]
    if plan.devices:
        lines += ["nodes on several devices, each planned against its own budget (the tables below: "
                  f"{next(d for d, v in plan.devices.items() if v['main'])}, where the trainable parts live):"]
        lines += [f"  {d:<8} {', '.join(v['nodes']) or '(the trainable parts only)'}: training step "
                  f"{format_mib(v['peak'])}, evaluation {format_mib(v['eval_peak'])} of {format_mib(v['budget'])} "
                  f"({max(v['peak'], v['eval_peak']) / v['budget']:.0%})" for d, v in plan.devices.items()]
        lines.append("")
    header = f"{'node':<10} {'layers':>8} {'group':>5} {'bytes':>12}  placement (layers 0-based, trained)"
    lines += [header, "-" * len(header)]
    index: dict[str, int] = {}
    for g in plan.groups:
        index[g.node] = index.get(g.node, 0) + 1
        span = f"{g.first}-{g.last - 1}" if g.last - g.first > 1 else str(g.first)
        lines.append(f"{g.node:<10} {span:>8} {index[g.node]:>5} {format_mib(g.bytes):>12}  "
                     f"{'resident' if g.resident else 'streamed'}{' from disk' if g.disk else ''}, "
                     f"{'recomputed in backward' if g.checkpointed else 'keeps its activations'}")
    streamed = plan.streamed_bytes
    lines += ["", f"resident {format_mib(plan.resident_bytes)}; streamed {format_mib(streamed)}"
              + (f" (pinned host slab; prefetch depth {plan.prefetch_depth}; {plan.schedule} schedule, "
                 f"{plan.traffic_per_step / 1e9:.2f} GB host-to-device per step)" if streamed else "")
              + (f"; on disk {format_mib(plan.disk_bytes)} ({plan.disk_per_step / 1e9:.2f} GB read per step)"
                 if plan.disk_bytes else ""),
              f"trainable parameters: {plan.trainable_params:,}", ""]
    lines += format_timing(plan) + ["", "training step peak:"]
    for k, v in plan.breakdown.items():
        lines.append(f"  {k:<20} {format_mib(v):>12}  {_WHY.get(k, '')}")
    verdict = "fits" if plan.peak <= plan.budget else "DOES NOT FIT"
    lines.append(f"  {'predicted peak':<20} {format_mib(plan.peak):>12}  vs budget {format_mib(plan.budget)} "
                 f"({plan.peak / plan.budget:.0%}, {verdict})")
    lines += ["", f"evaluation (no grad, micro-batch {plan.micro_batch}, placed as in training):"]
    for k, v in plan.eval_breakdown.items():
        lines.append(f"  {k:<20} {format_mib(v):>12}  {_WHY.get(k, '')}")
    lines.append(f"  {'predicted peak':<20} {format_mib(plan.eval_peak):>12}  vs budget {format_mib(plan.budget)} "
                 f"({plan.eval_peak / plan.budget:.0%})")
    on_disk = plan.disk_bytes + sum(placed.disk_bytes for placed in plan.frozen.values())
    lines += ["", "host memory (every node lives there under a plan" + (
        f", but for {format_mib(on_disk)} of layer groups in the node cache on disk):" if on_disk else "):")]
    for k, v in plan.host_breakdown.items():
        lines.append(f"  {k:<20} {format_mib(v):>12}  {_WHY.get(k, '')}")
    lines.append(f"  {'predicted peak':<20} {format_mib(plan.host_peak):>12}  vs {format_mib(plan.host_available)} available "
                 f"({plan.host_peak / plan.host_available:.0%})")
    lines += ["", f"frozen pass (once over the data, one node at a time, micro-batch {plan.frozen_micro_batch}, "
                  "embeddings on the host):",
              f"  {'node':<10} {'layers':>8} {'resident':>12} {'streamed':>12} {'slots':>5} {'peak':>12}"
              + (f" {'on disk':>12}" if on_disk else "")]       # the column only where the disk tier is used
    for name, placed in plan.frozen.items():
        last = placed.groups[-1].last if placed.groups else 0
        lines.append(f"  {name:<10} {f'0-{last - 1}' if last else '-':>8} "
                     f"{format_mib(placed.resident_bytes):>12} {format_mib(placed.streamed_bytes):>12} "
                     f"{placed.prefetch_depth:>5} {format_mib(placed.peak):>12}"
                     + (f" {format_mib(placed.disk_bytes):>12}" if on_disk else "")
                     + (f" (layers {_spans(g for g in placed.groups if g.disk)})" if placed.disk_bytes else ""))
    parts = ", ".join(f"{k} {format_mib(v)}" for k, v in plan.frozen[plan.frozen_node].breakdown.items())
    lines += [f"  peak ({plan.frozen_node}): {parts} = {format_mib(plan.frozen_pass_peak)}",
              (f"smallest budget with a plan: {format_gib(plan.minimum)} (training step alone "
               f"{format_gib(plan.minimum_training)}, frozen pass {format_gib(plan.minimum_frozen)})")]
    return "\n".join(lines)
