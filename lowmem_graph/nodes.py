"""FrozenNode: one frozen causal LM, loaded in 4-bit, with its own tokenizer, run layer by layer.

The model's code is never copied or patched: one forward through stand-ins records the calls its own loop makes of
each decoder layer (`layer_calls`: masks, rotary tables, each layer's attention type), and the graph then runs the
layers itself, writing into the stream and reading it between them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import bitsandbytes as bnb
import torch
from safetensors import SafetensorError

from .errors import UserError, hub_error
from .files import atomic_dir, atomic_file, file_sha256, remove_stale_temps
from .spec import NodeSpec

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder layer whose output a cache already holds."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer while `layer_calls` records how the model's loop calls it."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def forward(self, hidden_states, *args, **kwargs):
        return self.record(hidden_states, *args, **kwargs)


def pool(states: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per example: masked mean, or the last real token (right padding)."""
    mask = attention_mask.to(states.device)
    if how == "last":
        last = mask.sum(1).long() - 1
        return states[torch.arange(states.shape[0], device=states.device), last]
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp_min(1.0)


class _CastWarning(logging.Filter):
    """Drops bitsandbytes' per-call "inputs will be cast to float16" warning for int8 nodes (the cast is by design:
    LLM.int8 quantises its input from fp16)."""

    def filter(self, record):
        return "will be cast from" not in record.getMessage()


_CAST_WARNING = _CastWarning()     # one instance: addFilter ignores a filter already added


class _StopForward(Exception):
    """Raised by the read hook: everything above the read layer is wasted work for a reader."""

    def __init__(self, hidden):
        self.hidden = hidden


def _quiet_transformers():
    """transformers' warnings and per-load bars off (noise beside the run's own progress); the hub's download bars,
    which transformers turns off with its own, back on where someone watches: a first paper run downloads 38 GB."""
    import transformers
    from huggingface_hub.utils import enable_progress_bars

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if sys.stderr.isatty():
        enable_progress_bars()


def resolve_model(ref: str) -> tuple[str, bool]:
    """(what from_pretrained takes, is_local) for a node's `model` field. Converts llama2.c files."""
    from .tiny import cache_root, tiny_path

    if ref.startswith("tiny:"):
        return str(tiny_path(ref[len("tiny:"):])), True
    path = Path(ref).expanduser()
    if path.exists():
        if path.is_file():
            from .llama2c import convert_llama2c, is_llama2c_checkpoint

            if not is_llama2c_checkpoint(path):
                raise UserError(f"model path {path} is a file, but not a llama2.c checkpoint (expected a folder)")
            digest = file_sha256(path)
            out = cache_root() / "llama2c" / f"{path.stem}-{digest[:16]}"
            if not (out / "config.json").exists():
                convert_llama2c(path, out)
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
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                            **({} if is_local else {"revision": revision}))
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{ref!r} needs Python code of its own to load; set trust_remote_code: true on its node "
                            "only if you trust that code") from None
        if is_local:
            raise UserError(f"cannot load config of {ref!r} (a local folder): {str(e).splitlines()[0]}") from None
        raise hub_error(f"model {ref!r}", e) from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{ref!r} is a {config.model_type!r} model, not a causal LM (AutoModelForCausalLM)")
    return config, source, is_local


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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def freeze_linears(model):
    """The model's quantised linears set up to be frozen (one code path, with and without grad)."""
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights in place for its CPU inference kernel, but only for inputs
        # without grad: the same node would then run two code paths and its stored weights would change.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        if type(module) is bnb.nn.Linear8bitLt:
            module.__class__ = FrozenInt8Linear
    return model


class FrozenInt8Linear(bnb.nn.Linear8bitLt):
    """LLM.int8 with a frozen weight: bitsandbytes' int8 forward, and a backward that needs the weight alone.

    bitsandbytes' own autograd keeps each input on its context (for a weight gradient nobody takes here), out of
    the saved-tensor hooks that checkpointing works through: a checkpointed group of int8 layers would hold every
    linear's input until backward (13x the group's checkpoint, measured on Llama at 1/8 width)."""

    def forward(self, x):
        return _FrozenInt8Matmul.apply(x, self)


class _FrozenInt8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.module, ctx.dtype = module, x.dtype     # no tensors: backward reads the weight where it is then
        return bnb.nn.Linear8bitLt.forward(module, x)    # grad is off in here

    @staticmethod
    def backward(ctx, grad):
        state = ctx.module.state         # bitsandbytes' own dequantisation, as in its backward
        weight = state.CB.to(ctx.dtype, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))
        return grad.to(ctx.dtype) @ weight, None


class FrozenNode:
    """A frozen causal LM with its own tokenizer and framing prefix."""

    def __init__(self, spec: NodeSpec, model, tokenizer, max_length: int, identity: str = "", device=None):
        self.spec = spec
        self.device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
        self.identity = identity      # names the exact frozen weights (source + quantisation): cache keys use it
        self.model = freeze_linears(model)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.layers = getattr(self.base, "layers", None)
        if not isinstance(self.layers, torch.nn.ModuleList):
            raise UserError(f"node {spec.name!r}: {type(model).__name__} has no decoder-layer list (.layers); "
                            "only decoder-only causal LMs can be nodes")
        self.width = model.config.get_text_config().hidden_size
        self.n_layers = len(self.layers)
        self.read_layer = spec.read_index(self.n_layers)
        self.inject_layer = spec.inject_index(self.n_layers)

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: NodeSpec, quant: str = "nf4", device=None, max_length: int = 512,
             compute_device=None, logits: bool = False, progress=None) -> "FrozenNode":
        """Load a node frozen: NF4 with double quantisation (saved once, reloaded without quantising), LLM.int8,
        or bf16/fp32.

        `device` is where the weights live; `compute_device` (default: the same) picks the compute dtype, so a
        node kept on the host for a GPU run computes in bf16 when it visits the GPU. A graph never asks a node for
        logits, so its lm_head is dropped (0.46 GB of the paper graph) unless `logits` (zero-shot scoring)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        device = torch.device(device) if device is not None else default_device()
        trust = {"trust_remote_code": spec.trust_remote_code}
        config, source, is_local = load_config(spec.model, revision=spec.revision, **trust)
        commit = None if is_local else hub_commit(source, spec.revision)
        identity = source_identity(source, is_local, commit)
        pinned = {} if is_local else {"revision": commit or spec.revision}
        compute = torch.bfloat16 if torch.device(compute_device or device).type == "cuda" else torch.float32
        kwargs = {"device_map": {"": device.index if device.type == "cuda" and device.index is not None
                                 else device.type}}
        load_from, save_to = source, None
        if getattr(config, "quantization_config", None) is not None:
            kwargs["dtype"] = compute                 # pre-quantised checkpoint (bnb, or GPTQ through optimum)
        elif quant == "int8":
            # LLM.int8: per-row int8 weights, outlier columns of the input (|x| > 6) multiplied in 16-bit. Rounding
            # each row is one pass over the weights, so there is no saved copy. bitsandbytes casts every input to
            # fp16 for its int8 quantisation (by design) and warns about it at every call: that warning is dropped.
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["dtype"] = compute
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_CAST_WARNING)
        elif quant == "nf4":
            cached = _quantised_cache_dir(identity, source, quant, compute)   # the compute dtype is saved too
            if _verified(cached):
                load_from = str(cached)
            else:
                save_to = cached
                if progress:
                    progress(f"{spec.name}: quantising to NF4 on the {device.type.upper()}, once (saved for later "
                             "runs; on a CPU about a minute per billion parameters on two cores)")
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=compute)
            kwargs["dtype"] = compute
        else:
            kwargs["dtype"] = torch.bfloat16 if quant == "bf16" else torch.float32
        try:
            from_hub = pinned if load_from == source else {}     # the commit the config resolved to
            model = AutoModelForCausalLM.from_pretrained(load_from, **kwargs, **from_hub, **trust)
            tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or load_from, **trust,
                                                      **({} if spec.tokenizer else from_hub))
        except (OSError, ValueError, SafetensorError) as e:
            if is_local or load_from != source:
                raise UserError(f"cannot load model {spec.model!r}: {type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:200]}") from None
            raise hub_error(f"model {spec.model!r}", e) from None
        if save_to is not None:
            _save_atomically(model, tokenizer, save_to)
        if not logits and model.get_output_embeddings() is not None:
            model.set_output_embeddings(None)      # a tied head shares the embedding table, which stays
        model.eval().requires_grad_(False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"
        return cls(spec, model, tokenizer, max_length, f"{identity}|{quant}|{compute}", device)

    # ---- running -------------------------------------------------------------------------------------------
    def encode(self, texts: list[str], offsets: bool = False) -> dict[str, torch.Tensor]:
        """Tokenize `prefix + text` with this node's own tokenizer, right-padded: input_ids, attention_mask and,
        with `offsets`, offset_mapping. A sequence over max_length keeps its framing prefix (and BOS) and the end
        of the text, where the question and answer options sit; the middle goes, never the framing."""
        fast = self.tokenizer.is_fast
        enc = self.tokenizer([self.spec.prefix + t for t in texts], return_offsets_mapping=fast)
        spans = enc["offset_mapping"] if fast else [[(0, 0)] * len(ids) for ids in enc["input_ids"]]
        rows = [self._fit(list(ids), list(row)) for ids, row in zip(enc["input_ids"], spans)]
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        out = {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
               "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])}
        if offsets:
            if not fast:
                raise UserError(f"node {self.spec.name!r}: per-token injection needs a fast tokenizer (offsets)")
            out["offset_mapping"] = torch.tensor([row + [(0, 0)] * (width - len(row)) for _, row in rows])
        return out

    def token_lengths(self, texts: list[str]) -> list[int]:
        """How many tokens `encode` gives each text (no padding, no tensors)."""
        if not texts:           # a set left empty (every question also a training one): the tokenizer fails on []
            return []
        encoded = self.tokenizer([self.spec.prefix + t for t in texts])["input_ids"]
        return [min(len(ids), self.max_length) for ids in encoded]

    def _fit(self, ids: list[int], spans: list) -> tuple[list[int], list]:
        """Cut a sequence over max_length in the middle: the prefix's tokens stay, then the text's last tokens."""
        if len(ids) <= self.max_length:
            return ids, spans
        if self.tokenizer.is_fast:   # leading tokens that end inside the prefix (BOS has an empty span)
            head = next((i for i, (_, end) in enumerate(spans) if end > len(self.spec.prefix)), len(ids))
        else:
            head = len(self.tokenizer(self.spec.prefix)["input_ids"])
        if head > self.max_length // 2:
            raise UserError(f"node {self.spec.name!r}: its prefix takes {head} tokens, over half of "
                            f"max_length {self.max_length}: shorten the prefix or raise max_length")
        tail = len(ids) - (self.max_length - head)
        return ids[:head] + ids[tail:], spans[:head] + spans[tail:]

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def final(self, input_ids, attention_mask) -> torch.Tensor:
        """Final hidden states (B, T, d), after the final norm: the node by itself, nothing written into it."""
        with self._autocast():
            return self._forward(input_ids, attention_mask).last_hidden_state

    @torch.no_grad()
    def layer_calls(self, input_ids, attention_mask, start: int = 0, prefix: torch.Tensor | None = None):
        """(the stream entering decoder layer `start`, the model's own calls of the layers from `start` up), for
        running the layers one at a time: nodes coupled by bridges advance together, layer by layer.

        One forward without grad: the layers below `start` run (input-only work; with `prefix`, the cached stream
        entering `start`, they do not), and the others are stand-ins recording how the model's loop calls them
        (masks, rotary tables, each layer's attention type), so every architecture keeps its own arguments.
        A call is (layer, args, kwargs): `layer(hidden, *args, **kwargs)` runs it."""
        calls: list = []
        entering: list = []
        originals = list(self.layers)

        def recorder(index):
            def record(hidden_states, *args, **kwargs):
                if index == start:
                    entering.append(hidden_states)
                calls.append((originals[index], args, kwargs))
                if index == len(originals) - 1:
                    raise _StopForward(None)
                return hidden_states
            return record

        try:
            for i in range(len(originals)):
                if i >= start:
                    self.layers[i] = _Recorder(recorder(i))
                elif prefix is not None:
                    self.layers[i] = _PassThrough()
            with self._autocast():
                if prefix is None:
                    self._forward(input_ids, attention_mask)
                else:
                    self.base(inputs_embeds=prefix.to(self.device), attention_mask=attention_mask.to(self.device),
                              use_cache=False)
        except _StopForward:
            pass
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        if len(calls) != len(originals) - start:
            raise RuntimeError(f"node {self.spec.name!r}: the model's loop called {len(calls)} of its decoder "
                               f"layers {start}..{len(originals) - 1}")
        # the cached stream itself, not what the stand-ins carried (Gemma-2 scales what enters as embeddings)
        return (prefix.to(self.device) if prefix is not None else entering[0]), calls

    def logits(self, final: torch.Tensor) -> torch.Tensor:
        """Next-token logits from final (normed) states: the frozen LM head (the node loaded with `logits`),
        with the model's own final soft-capping where it has one (Gemma-2)."""
        head = self.model.get_output_embeddings()
        if head is None:
            raise RuntimeError(f"node {self.spec.name!r} was loaded without its LM head")
        with self._autocast():
            out = head(final.to(head.weight.dtype if head.weight.is_floating_point() else final.dtype))
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out.float() / cap) * cap
        return out

    def _forward(self, input_ids, attention_mask):
        """The base model's forward; with the embedding table on the host, the lookup happens there."""
        table = self.base.get_input_embeddings()
        mask = attention_mask.to(self.device)
        if table.weight.device == self.device:
            return self.base(input_ids=input_ids.to(self.device), attention_mask=mask, use_cache=False)
        embeds = table(input_ids.to(table.weight.device)).to(self.device)
        return self.base(inputs_embeds=embeds, attention_mask=mask, use_cache=False)

    def frozen_tensors(self):
        """Every weight and buffer of the frozen model (for checks that training leaves them untouched)."""
        yield from self.model.state_dict().items()


def _save_atomically(model, tokenizer, path: Path) -> None:
    """The quantised copy, with every file's SHA-256 in checksums.json (checked on each load)."""
    remove_stale_temps(path.parent)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sums = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "checksums.json").write_text(json.dumps(sums, indent=1))


def _verified(folder: Path) -> bool:
    """Whether a quantised copy is there and whole (every file matches its recorded SHA-256); a damaged or
    incomplete one is deleted, so the node is quantised again."""
    if not folder.exists():
        return False
    from concurrent.futures import ThreadPoolExecutor

    try:
        sums = json.loads((folder / "checksums.json").read_text())
        names = sorted(sums)
        with ThreadPoolExecutor(4) as pool:        # hashlib releases the GIL
            whole = list(pool.map(file_sha256, [folder / n for n in names])) == [sums[n] for n in names]
        whole = whole and "config.json" in sums and all("/" not in n and n != ".." for n in names)
    except (OSError, ValueError, TypeError, AttributeError):
        whole = False
    if not whole:
        print(f"lowmem-graph: the quantised copy {folder} is damaged or incomplete: quantising the node again",
              file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    return whole
