"""Finding a node's model and its saved quantised copy: model references (a hub id, a local folder, a llama2.c
file, `tiny:<arch>`), configs with clear errors, what names a model's weights (a hub commit, a folder's SHA-256),
and the NF4 copy quantised once, saved with every file's SHA-256 and checked on each load. FrozenNode.load
(nodes.py) loads through these."""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import torch

from .errors import UserError, hub_error
from .files import atomic_dir, atomic_file, file_sha256, remove_stale_temps, seal, sealed

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")   # gpt2, openai-community/gpt2


def _quiet_transformers():
    """transformers' warnings and per-load bars off (noise beside the run's own progress); the hub's download bars,
    which transformers turns off with its own, back on where someone watches: a first paper run downloads 38 GB."""
    import transformers
    from huggingface_hub.utils import enable_progress_bars

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if sys.stderr.isatty():
        enable_progress_bars()


def llama2c_folder(path: Path, digest: str) -> Path:
    """Where a llama2.c checkpoint's converted model is cached, named by its file's SHA-256 (resolve_model converts
    it there; the planner only looks)."""
    from .tiny import cache_root

    return cache_root() / "llama2c" / f"{path.stem}-{digest[:16]}"


def resolve_model(ref: str) -> tuple[str, bool]:
    """(what from_pretrained takes, is_local) for a node's `model` field. Converts llama2.c files."""
    from .tiny import tiny_path

    if ref.startswith("tiny:"):
        return str(tiny_path(ref[len("tiny:"):])), True
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_file():
            from .llama2c import convert_llama2c, is_llama2c_checkpoint

            if not is_llama2c_checkpoint(path):
                raise UserError(f"model path {path} is a file, but not a llama2.c checkpoint (expected a folder)")
            digest = file_sha256(path)
            out = llama2c_folder(path, digest)
            key = {"cache": "llama2c", "sha256": digest}
            if not sealed(out, key, "the converted llama2.c model"):
                if out.exists():
                    print(f"lowmem-graph: the converted llama2.c model {out} is damaged, incomplete or not {path}'s: "
                          "converting it again", file=sys.stderr)
                    shutil.rmtree(out, ignore_errors=True)
                convert_llama2c(path, out, key=key)        # sealed before its rename: never seen unsealed
            return str(out), True
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json: not a Hugging Face model folder")
        return str(path), True
    if not _HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise UserError(f"model path not found: {ref}")
    return ref, False


def bundled_config(ref: str):
    """The config of a model the presets use, shipped with the package: `inspect` and `plan` need no download."""
    import json
    from importlib import resources

    from transformers import AutoConfig

    path = resources.files("lowmem_graph.presets") / "configs" / (ref.replace("/", "__") + ".json")
    return AutoConfig.for_model(**json.loads(path.read_text())) if path.is_file() else None


def load_config(ref: str, prefer_bundled: bool = False, revision: str | None = None, trust_remote_code: bool = False):
    """The model's config, with clear errors for unknown ids and models that are not causal LMs. Python shipped
    with a model runs only with `trust_remote_code` (a node's opt-in); never after a question at a prompt."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    _quiet_transformers()
    if prefer_bundled and (config := bundled_config(ref)) is not None:
        return config, ref, False
    source, is_local = resolve_model(ref)
    if not is_local:
        _reach_hub(ref, source, revision)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                            **({} if is_local else {"revision": revision}))
    except _invalid_config() as e:      # the config's own checks (heads that do not divide the width, ...)
        raise UserError(f"the config of {ref!r} is invalid: {_first_line(e.__cause__ or e)}") from None
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{ref!r} needs Python code of its own to load; set trust_remote_code: true on its node "
                            "only if you trust that code") from None
        if is_local:
            raise UserError(f"cannot load config of {ref!r} (a local folder): {_first_line(e)}") from None
        raise hub_error(f"model {ref!r}", e) from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{ref!r} is a {config.model_type!r} model, not a causal LM (AutoModelForCausalLM)")
    return config, source, is_local


def _reach_hub(ref: str, source: str, revision: str | None) -> None:
    """A hub id not in the local cache: one request to the hub now, without huggingface_hub's retries (offline they
    take 30 s and a dozen lines before the same failure): no network, a gated or unknown id is one line at once."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(source, "config.json", revision=revision), str):
        return          # offline mode fails at once by itself; a cached model loads without the hub
    try:
        get_hf_file_metadata(hf_hub_url(source, "config.json", revision=revision), timeout=10)
    except Exception as e:          # httpx's and the hub's errors share no base class
        raise hub_error(f"model {ref!r}", e) from None


def _invalid_config() -> tuple[type, ...]:
    """The error huggingface_hub's strict dataclasses raise when a config fails its own validation."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:         # an older huggingface_hub: configs then check themselves with ValueError
        return ()
    return (StrictDataclassError,)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def hub_commit(source: str, revision: str | None = None) -> str | None:
    """The commit a hub id (at `revision`) resolves to, read off the cached config's snapshot path."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:
        return extract_commit_hash(cached_file(source, "config.json", revision=revision), None)
    except OSError:
        return None


def source_identity(source: str, is_local: bool, commit: str | None = None) -> str:
    """What names a model's weights: a hub id with its commit, or the SHA-256 of a local folder's weight, config and
    tokenizer files (new weights of the same size and time are new weights)."""
    if not is_local:
        return f"{source}@{commit or 'unresolved'}"
    return f"local:{folder_digest(Path(source))}"


_HASHED = (".safetensors", ".bin", ".pt", ".json", ".model", ".txt")


def folder_digest(folder: Path) -> str:
    """SHA-256 over the files that make a model (name and content). A file's digest is remembered under its inode,
    size, mtime and ctime (ctime changes on every write and cannot be set back), so a folder is read once."""
    from .tiny import cache_root

    memo_path = cache_root() / "file-digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    parts, changed = [], False
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _HASHED):
        st = path.stat()
        key = f"{path.resolve()}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
        if key not in memo:
            memo[key], changed = file_sha256(path), True
        parts.append((path.name, memo[key]))
    if changed:
        with contextlib.suppress(OSError):
            with atomic_file(memo_path) as tmp:
                tmp.write_text(json.dumps(memo))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _quantised_cache_dir(identity: str, source: str, quant: str, compute=torch.float32) -> Path:
    """Where a node quantised once is saved, keyed by its source identity (a new hub commit: a new folder)."""
    from .tiny import cache_root

    key = f"{identity}|{compute}"
    slug = re.sub(r"[^\w.-]+", "_", source.strip("/"))[-60:]
    return cache_root() / "nodes" / f"{slug}-{quant}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def node_key(identity: str, quant: str, compute=torch.float32) -> dict:
    """What a quantised copy is a copy of (recorded in it, checked on each load): the exact weights (a hub commit or
    a folder's SHA-256), the format and the compute dtype."""
    return {"cache": "nodes", "identity": identity, "quant": quant, "compute": str(compute)}


def _save_atomically(model, tokenizer, path: Path, key: dict) -> None:
    """The quantised copy, sealed: its key and every file's SHA-256 in checksums.json (checked on each load)."""
    remove_stale_temps(path.parent)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        seal(tmp, key)


def _verified(folder: Path, key: dict) -> bool:
    """Whether a quantised copy of `key` is there and whole; a damaged, incomplete or swapped one is deleted, so
    the node is quantised again. A link is refused in one line."""
    if not folder.exists() and not folder.is_symlink():
        return False
    whole = sealed(folder, key, "the quantised copy")
    if not whole:
        print(f"lowmem-graph: the quantised copy {folder} is damaged, incomplete or not this node's: quantising "
              "the node again", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    return whole


def decoder_parts(model):
    """(decoder, its list of layers, its final norm), wherever the architecture keeps them: `.layers` and `.norm`
    (Llama and its kin), `.h` and `.ln_f` (GPT-2). (None, None, None) parts are not a decoder-only LM's."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = next((getattr(base, n) for n in ("layers", "h")
                   if isinstance(getattr(base, n, None), torch.nn.ModuleList)), None)
    norm = next((getattr(base, n) for n in ("norm", "ln_f") if getattr(base, n, None) is not None), None)
    return base, layers, norm


def linears_from_conv1d(model):
    """GPT-2's Conv1D projections as the equivalent nn.Linear (weight transposed): the size estimates count linear
    weights in the frozen format, and bitsandbytes quantises a Conv1D as the same transposed linear."""
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                linear = torch.nn.Linear(n_in, n_out, device=child.weight.device, dtype=child.weight.dtype)
                if child.weight.device.type != "meta":
                    with torch.no_grad():
                        linear.weight.copy_(child.weight.t())
                        linear.bias.copy_(child.bias)
                linear.requires_grad_(child.weight.requires_grad)
                setattr(module, name, linear)
    return model


def meta_model(ref: str, revision: str | None = None, trust_remote_code: bool = False):
    """(config, model) with every tensor on the meta device: shapes without memory, weights or download."""
    from transformers import AutoModelForCausalLM

    config, _, _ = load_config(ref, prefer_bundled=True, revision=revision, trust_remote_code=trust_remote_code)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return config, linears_from_conv1d(model)
    except (ValueError, *_invalid_config()) as e:     # a config whose shapes no model can have
        raise UserError(f"the config of {ref!r} is invalid: {_first_line(e.__cause__ or e)}") from None
