"""A node's NF4 copy quantised module by module from its safetensors checkpoint, on the run's device.

transformers' `from_pretrained(quantization_config=...)` followed by `save_pretrained` (the path this replaces for
the node cache) holds the whole quantised model in host memory, and under a plan (weights on the host) it quantises
on the CPU: 523 s and a 6.2 GiB anonymous peak for Mistral-7B on two cores. Here each module's tensors are read
from the checkpoint alone (safe_open), its linear weights quantised by bitsandbytes' own Params4bit on the device
(one weight there at a time; the packed result comes back), and its state-dict entries appended to a scratch file;
the model file is then written by safetensors from views of that file (mapped pages, not memory the run holds).
Host memory is about one module. The files are those `save_pretrained` writes, byte for byte (tests/test_quantise.py,
every tiny architecture and stories260K): the same quantiser decides which linears are quantised, the modules' own
`_save_to_state_dict` names the entries, safetensors lays out the file.

A checkpoint this path cannot read as from_pretrained would (no safetensors, keys renamed or missing) returns
False: the caller quantises the old way.
"""
from __future__ import annotations

import json
import mmap
from pathlib import Path

import torch

SCRATCH = ".quantised.scratch"


def checkpoint_files(source: str, is_local: bool, revision: str | None = None) -> list[Path] | None:
    """The checkpoint's safetensors files (downloaded first for a hub id: the first run's download), or None when
    it has none (a .bin checkpoint)."""
    index, single = "model.safetensors.index.json", "model.safetensors"
    if is_local:
        fetch = (lambda name: str(Path(source) / name) if (Path(source) / name).is_file() else None)
    else:
        from transformers.utils.hub import cached_file

        def fetch(name):
            return cached_file(source, name, revision=revision, _raise_exceptions_for_missing_entries=False)
    found = fetch(index)
    if found:
        shards = sorted(set(json.loads(Path(found).read_text())["weight_map"].values()))
        paths = [fetch(s) for s in shards]
        return None if None in paths else [Path(p) for p in paths]
    found = fetch(single)
    return [Path(found)] if found else None


def quantiser_config(compute: torch.dtype):
    """NF4 with double quantisation: the one 4-bit format nodes use (FrozenNode.load)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def skeleton(config, compute: torch.dtype, trust_remote_code: bool = False):
    """The model on the meta device with its linears replaced as from_pretrained replaces them (transformers' own
    bitsandbytes quantiser picks them: not the head, not tied weights); `.conv1d` names GPT-2's Conv1D modules."""
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    default = torch.get_default_dtype()
    torch.set_default_dtype(compute)        # as from_pretrained does: the new linears' biases in `compute`
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=compute, trust_remote_code=trust_remote_code)
        conv1d = {name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"}     # GPT-2's
        quantiser = AutoHfQuantizer.from_config(quantiser_config(compute), pre_quantized=False)
        quantiser.preprocess_model(model=model, dtype=compute, device_map={"": "cpu"}, checkpoint_files=None)
    finally:
        torch.set_default_dtype(default)
    model.conv1d = conv1d       # their weights are stored transposed: quantised as the linear they become
    return model


def _saved_names(model) -> dict[str, tuple[torch.nn.Module, str]]:
    """Every entry save_pretrained writes before quantisation: each module's direct parameters and persistent
    buffers, a tied tensor under its first name only (save_pretrained drops the others)."""
    seen, out = set(), {}
    for prefix, module in model.named_modules():
        persistent = [n for n, b in module._buffers.items() if b is not None
                      and n not in module._non_persistent_buffers_set]
        for attr in [n for n, p in module._parameters.items() if p is not None] + persistent:
            tensor = getattr(module, attr)
            if id(tensor) not in seen:
                seen.add(id(tensor))
                out[f"{prefix}.{attr}" if prefix else attr] = (module, attr)
    return out


def quantise_to_folder(source: str, revision: str | None, files: list[Path], config, compute: torch.dtype,
                       device: torch.device, folder: Path, trust_remote_code: bool = False) -> bool:
    """Write the quantised node's model.safetensors, config.json and generation_config.json into `folder`, module
    by module, quantising on `device`. False (nothing written) when the checkpoint's keys are not the model's."""
    import bitsandbytes as bnb
    from safetensors import safe_open

    model = skeleton(config, compute, trust_remote_code)
    names = _saved_names(model)
    where = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            where.update({k: path for k in f.keys()})
    if not set(names) <= set(where):
        return False        # renamed or missing keys: from_pretrained's conversions, not ours
    by_module: dict[int, list[str]] = {}
    for name, (module, _) in names.items():
        by_module.setdefault(id(module), []).append(name)
    scratch, entries = folder / SCRATCH, []
    handles = {path: safe_open(str(path), framework="pt") for path in files}
    try:
        with open(scratch, "wb") as out:
            for group in by_module.values():
                module = names[group[0]][0]
                prefix = group[0].rpartition(".")[0]
                for name in group:
                    _materialise(module, names[name][1], handles[where[name]].get_tensor(name), compute, device, bnb,
                                 transpose=prefix in model.conv1d)
                state: dict[str, torch.Tensor] = {}
                module._save_to_state_dict(state, prefix + "." if prefix else "", False)
                for key, tensor in state.items():
                    if tensor.device.type == "meta":
                        continue        # tied to a tensor saved under another name
                    data = tensor.detach().to("cpu").contiguous()
                    entries.append((key, data.dtype, tuple(data.shape), out.tell(), data.nbytes))
                    out.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
                    del data
                for name in group:      # back to meta: one module in memory at a time
                    attr = names[name][1]
                    parts = module._parameters if attr in module._parameters else module._buffers
                    parts[attr] = torch.empty(0, device="meta")
                del state
                _trim()
        _write_model(scratch, entries, folder / "model.safetensors")
        if device.type == "cuda":
            torch.cuda.empty_cache()    # the largest weight's blocks, cached: the run's plan has not counted them
    finally:
        handles.clear()
        scratch.unlink(missing_ok=True)
    _write_configs(model, compute, source, revision, folder)
    return True


def _trim() -> None:
    """Freed memory back to the system after each module (glibc's malloc_trim): once glibc's mmap threshold has
    risen it keeps freed chunks of tens of MB in its heap. Without it, a 301M-parameter Llama (vocab 32000, width
    1536) peaked at 0.95 GiB anonymous here against the old way's 0.80; with it, 0.38 GiB (bench_quantise.py's
    child, 2026-12-05)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def _materialise(module, attr: str, tensor: torch.Tensor, compute, device, bnb, transpose: bool = False) -> None:
    """One checkpoint tensor into its module as from_pretrained puts it there: a linear weight quantised on `device`
    and brought back (a Conv1D's, `transpose`, transposed first), anything else cast to its meta tensor's dtype."""
    current = getattr(module, attr)
    if isinstance(module, bnb.nn.Linear4bit) and attr == "weight":
        if transpose:
            tensor = tensor.T
        weight = bnb.nn.Params4bit(tensor.to(device=device, dtype=compute), requires_grad=False,
                                   **current.__dict__).to(device)
        module.weight = weight.to("cpu") if device.type != "cpu" else weight
        return
    dtype = current.dtype if current.is_floating_point() else tensor.dtype
    value = tensor.to(dtype)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _write_model(scratch: Path, entries: list, path: Path) -> None:
    """model.safetensors written by safetensors itself from views of the scratch file (its own header and layout,
    so the file is save_pretrained's byte for byte); each view its own storage (safetensors refuses shared ones)."""
    from .files import save_file

    with open(scratch, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if scratch.stat().st_size else None
    tensors = {key: (torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset) if nbytes
                     else torch.empty(0, dtype=torch.uint8)).view(dtype).reshape(shape)
               for key, dtype, shape, offset, nbytes in entries}
    save_file(tensors, path, metadata={"format": "pt"})     # the mapping goes with the last view


def _write_configs(model, compute, source: str, revision: str | None, folder: Path) -> None:
    """config.json and generation_config.json as save_pretrained writes them after a quantised load (the generation
    config read as from_pretrained reads it: its own file, else the model's config.json)."""
    from transformers import GenerationConfig

    config = model.config
    config.quantization_config = quantiser_config(compute)
    config.dtype = str(compute).split(".")[1]
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    if model.can_generate():
        try:
            generation = GenerationConfig.from_pretrained(source, revision=revision)
        except OSError:
            generation = GenerationConfig.from_pretrained(source, config_file_name="config.json", revision=revision,
                                                          _from_model_config=True)
        generation.save_pretrained(folder)


def save_quantised(source: str, is_local: bool, revision: str | None, config, compute: torch.dtype,
                   device: torch.device, path: Path, key: dict, tokenizer, trust_remote_code: bool = False) -> bool:
    """The node cache's copy at `path`, quantised module by module on `device` and sealed as loading.py's
    _save_atomically seals it; False (nothing written) when the checkpoint is not one this path reads."""
    from .files import atomic_dir, remove_stale_temps, seal

    files = checkpoint_files(source, is_local, revision)
    if files is None:
        return False
    remove_stale_temps(path.parent)
    try:
        with atomic_dir(path) as tmp:
            if not quantise_to_folder(source, revision, files, config, compute, device, tmp, trust_remote_code):
                raise _NotThisWay
            tokenizer.save_pretrained(tmp)
            seal(tmp, key)
    except _NotThisWay:
        return False
    return True


class _NotThisWay(Exception):
    """Raised inside atomic_dir to drop its folder when the checkpoint's keys are not the model's."""
