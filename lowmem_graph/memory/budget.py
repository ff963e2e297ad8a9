"""Budgets: `--gpu-mem` and `--host-mem` read as bytes (one size, or one per device), where each node computes, and
whether the devices and the host have the room a plan needs right now."""
from __future__ import annotations

import re

from ..errors import UserError
from .estimate import Plan
from .profile import CUDA_CONTEXT
from .report import GiB, KiB, MiB
from .report import format_gib as _gib

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 2 ** 40}


def parse_size(text: str) -> int:
    """'24G', '24GB', '6GiB', '512M', '1.5g', '100B', '10000000' -> bytes. Units are binary (G = 2**30); a plain
    number under 1 MiB is refused as a forgotten unit ('24' means 24G, not 24 bytes)."""
    match = _SIZE.match(str(text))
    if not match:
        raise UserError(f"cannot read memory size {text!r} (examples: 24G, 6GiB, 512M, 1.5g, or plain bytes)")
    number, unit, suffix = match.groups()
    if suffix and suffix.lower() == "ib" and not unit:
        raise UserError(f"cannot read memory size {text!r}: 'iB' needs a unit (KiB, MiB, GiB, TiB)")
    if not unit and "." in number:
        raise UserError(f"memory size {text!r} has a fraction of a byte (add a unit: K, M, G, T)")
    value = int(float(number) * _UNITS[unit.lower()])
    if value <= 0:
        raise UserError(f"memory size {text!r} must be positive")
    if not unit and not suffix and value < MiB:
        raise UserError(f"memory size {text!r} has no unit, so it would be {value} bytes: write {text}G for GiB "
                        f"(or {text}M)")
    return value


def parse_budgets(text: str) -> int | dict[str, int]:
    """`--gpu-mem`: one size for every device ("24G"), or a size per device ("cuda:0=24G,cuda:1=12G")."""
    if "=" not in text:
        return parse_size(text)
    budgets = {}
    for part in text.split(","):
        device, _, size = part.strip().partition("=")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", device.strip()):
            raise UserError(f"--gpu-mem {text}: {device!r} is not a device (cpu, cuda or cuda:N)")
        budgets[_device_name(device.strip())] = parse_size(size.strip())
    return budgets


def _device_name(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


def node_devices(spec, main: str = "cuda:0") -> dict[str, str]:
    """Node -> the device it computes on: its spec's `device`, else the run's (`main`)."""
    return {n.name: _device_name(n.device) if n.device else _device_name(main) for n in spec.nodes}


def host_available() -> int:
    """Host memory this machine has available now (psutil): what a plan's host figure is checked against."""
    import psutil

    return int(psutil.virtual_memory().available)


def device_needs(plan: Plan, main: str) -> dict[str, int]:
    """The most each device of the plan must hold at once: training step, evaluation, the frozen pass of its nodes."""
    if not plan.devices:
        return {main: max(plan.peak, plan.eval_peak, plan.frozen_pass_peak)}
    return {d: max([v["peak"], v["eval_peak"]] + [plan.frozen[n].peak for n in v["nodes"] if plan.frozen.get(n)])
            for d, v in plan.devices.items()}


def check_device_room(plan: Plan, main: str) -> None:
    """Refuse, before anything loads, a plan that a CUDA device cannot hold for what other programs use of it (a
    desktop, another run): the budget says what the run may take, not what is free. The plan's context allowance
    is set against the context this process has made by now, so only a certain shortfall is refused."""
    import torch

    for device, need in device_needs(plan, main).items():
        if not device.startswith("cuda"):
            continue
        free, total = torch.cuda.mem_get_info(torch.device(device))
        free += torch.cuda.memory_reserved(torch.device(device))    # this process's own cached blocks (an earlier run)
        if need - CUDA_CONTEXT > free:
            room = (free + CUDA_CONTEXT) // (GiB // 10) / 10
            raise UserError(f"the plan needs up to {_gib(need)} on {device}, but only {_gib(free)} of its "
                            f"{_gib(total)} is free (other programs hold the rest): close them, or plan for what "
                            f"is left with --gpu-mem {room:.1f}G")
