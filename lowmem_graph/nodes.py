"""FrozenNode: one frozen causal LM, loaded in 4-bit, with its own tokenizer, run layer by layer.

The model's code is never copied or patched: one forward with a stand-in hook on each decoder layer records the
calls its own loop makes of them (`layer_calls`: masks, rotary tables, each layer's attention type), and the graph
then runs the layers itself, writing into the stream and reading it between them. Finding and loading the model
(and its saved quantised copy) is loading.py's.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
import logging
import pickle
import re

import bitsandbytes as bnb
import torch
from safetensors import SafetensorError

from .errors import UserError, hub_error
from .hooks import StandIn, add_hook
from .loading import (_quantised_cache_dir, _save_atomically, _verified, decoder_parts, hub_commit, load_config,
                      node_key, source_identity)
from .masks import handed, host_masks
from .spec import NodeSpec


def autocast(device) -> AbstractContextManager:
    """The precision of every pass, through a node or the graph, training and evaluation alike (the one place it
    is decided): bf16 autocast on CUDA (the trainable weights stay fp32), full precision on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")



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


def _quantising_time(config, device) -> str:
    """This model's size and, on a CPU, how long NF4 takes it: about a minute per billion parameters on two cores
    (so a 7B model warns of minutes, a tiny one of nothing to wait for). The size comes from the config: no weights
    are read for a message."""
    text = config.get_text_config()
    width, layers = text.hidden_size, text.num_hidden_layers
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or width // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    ff = getattr(text, "intermediate_size", None) or 4 * width
    embeddings = text.vocab_size * width * (1 if getattr(text, "tie_word_embeddings", True) else 2)
    mlp = 3 if hasattr(text, "intermediate_size") else 2   # gated (Llama's kin) or not (GPT-2: n_inner)
    params = layers * (width * head_dim * 2 * (heads + kv_heads) + mlp * width * ff) + embeddings
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    if device.type != "cpu":
        return f"{size} parameters"
    seconds = params / 1e9 * 60
    wait = "under a second" if seconds < 1 else f"about {seconds:.0f} s" if seconds < 90 else \
        f"about {seconds / 60:.0f} min"
    return f"{size} parameters, {wait} on two cores"


def _quantised_by_module(spec, source, is_local, pinned, config, compute, where, path, key) -> bool:
    """The node's NF4 copy written module by module on `where` (quantise.py: about one module of host memory, not
    the model); False when its checkpoint is not safetensors under the model's own names (then from_pretrained
    quantises it)."""
    from transformers import AutoTokenizer

    from .quantise import save_quantised

    trust = {"trust_remote_code": spec.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or source, **trust, **({} if spec.tokenizer else pinned))
    return save_quantised(source, is_local, pinned.get("revision"), config, compute, where, path, key, tokenizer,
                          spec.trust_remote_code)


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
        self.base, self.layers, self.norm = decoder_parts(model)    # the final norm: .norm, or GPT-2's .ln_f
        if self.layers is None or self.norm is None:
            raise UserError(f"node {spec.name!r}: {type(model).__name__} has no decoder-layer list (.layers or .h) "
                            "and final norm; only decoder-only causal LMs can be nodes")
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

        from .quantise import quantiser_config

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
        where = torch.device(compute_device or device)       # quantised there: on a GPU even for a host node
        where = where if where.type == "cuda" else torch.device("cpu")
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
            if _verified(cached, node_key(identity, quant, compute)):
                load_from = str(cached)
            else:
                save_to = cached
                if progress:
                    progress(f"{spec.name}: quantising to NF4 on the {where.type.upper()}, once (saved for later "
                             f"runs): {_quantising_time(config, where)}")
                kwargs["quantization_config"] = quantiser_config(compute)      # the one NF4 format
            kwargs["dtype"] = compute
        else:
            kwargs["dtype"] = torch.bfloat16 if quant == "bf16" else torch.float32
        try:
            if save_to is not None and _quantised_by_module(spec, source, is_local, pinned, config, compute, where,
                                                            save_to, node_key(identity, quant, compute)):
                load_from, save_to = str(save_to), None          # then loaded as any saved copy is
                del kwargs["quantization_config"]
            from_hub = pinned if load_from == source else {}     # the commit the config resolved to
            model = AutoModelForCausalLM.from_pretrained(load_from, **kwargs, **from_hub, **trust)
            tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or load_from, **trust,
                                                      **({} if spec.tokenizer else from_hub))
        except pickle.UnpicklingError as e:     # torch.load(weights_only=True) refused what the pickle would run
            named = re.search(r"GLOBAL (\S+)", str(e))
            raise UserError(f"cannot load model {spec.model!r}: its weights are a pickle that does not load safely "
                            f"(it calls {named[1] if named else 'code'}, which weights_only loading refuses to run); "
                            "give it safetensors weights") from None
        except (OSError, ValueError, SafetensorError) as e:
            if is_local or load_from != source:
                raise UserError(f"cannot load model {spec.model!r}: {type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:200]}") from None
            raise hub_error(f"model {spec.model!r}", e) from None
        if save_to is not None:
            _save_atomically(model, tokenizer, save_to, node_key(identity, quant, compute))
        if not logits and model.get_output_embeddings() is not None:
            model.set_output_embeddings(None)      # a tied head shares the embedding table, which stays
        model.eval().requires_grad_(False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right"
        return cls(spec, model, tokenizer, max_length, f"{identity}|{quant}|{compute}", device)

    # ---- running -------------------------------------------------------------------------------------------
    def encode(self, texts: list[str], offsets: bool = False, keep_start: bool = False,
               start: list[bool] | None = None) -> dict[str, torch.Tensor]:
        """Tokenize `prefix + text` with this node's own tokenizer, right-padded: input_ids, attention_mask and,
        with `offsets`, offset_mapping. A sequence over max_length keeps its framing prefix (and BOS) and the end
        of the text, where the question and answer options sit; the middle goes, never the framing. `keep_start`
        (next-token prediction): it keeps its first max_length tokens instead, so that which tokens a model sees
        never depends on how long the text goes on. Rows marked in `start` begin with `start_token` (spanning no
        text, as a BOS does)."""
        fast = self.tokenizer.is_fast
        enc = self.tokenizer([self.spec.prefix + t for t in texts], return_offsets_mapping=fast)
        spans = enc["offset_mapping"] if fast else [[(0, 0)] * len(ids) for ids in enc["input_ids"]]
        if start is not None:
            enc["input_ids"] = [[self.start_token] * s + list(ids) for s, ids in zip(start, enc["input_ids"])]
            spans = [[(0, 0)] * s + list(row) for s, row in zip(start, spans)]
        rows = [(list(ids)[:self.max_length], list(row)[:self.max_length]) if keep_start
                else self._fit(list(ids), list(row)) for ids, row in zip(enc["input_ids"], spans)]
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        out = {"input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
               "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])}
        if offsets:
            if not fast:
                raise UserError(f"node {self.spec.name!r}: per-token injection needs a fast tokenizer (offsets)")
            out["offset_mapping"] = torch.tensor([row + [(0, 0)] * (width - len(row)) for _, row in rows])
        return out

    @property
    def start_token(self) -> int:
        """What the model reads before a text when there is nothing else to read (the first token of a text after
        an empty context has to be predicted from something): BOS, else EOS (GPT-2's <|endoftext|>), as the
        harness's HF model prefixes its empty contexts."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

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
        return autocast(self.device)

    def masks(self, attention_mask: torch.Tensor) -> dict | None:
        """The attention masks this node's layers take for a (B, T) host mask, made on the host (masks.py): what
        collation hands `layer_calls` and `final` as `masks`. None: the model makes its own, without a read."""
        return host_masks(self.model, attention_mask)

    def final(self, input_ids, attention_mask, masks: dict | None = None) -> torch.Tensor:
        """Final hidden states (B, T, d), after the final norm: the node by itself, nothing written into it.
        `masks`: as `layer_calls`'."""
        with self._autocast():
            return self._forward(input_ids, attention_mask, masks).last_hidden_state

    @torch.no_grad()
    def layer_calls(self, input_ids, attention_mask, start: int = 0, prefix: torch.Tensor | None = None,
                    masks: dict | None = None):
        """(the stream entering decoder layer `start`, the model's own calls of the layers from `start` up), for
        running the layers one at a time: nodes coupled by bridges advance together, layer by layer.

        One forward without grad: the layers below `start` run (input-only work; with `prefix`, the cached stream
        entering `start`, they do not), and the others have a stand-in hook (hooks.py) recording how the model's
        loop calls them (masks, rotary tables, each layer's attention type), so every architecture keeps its own
        arguments. A stand-in is not a run of its layer: the layer and torch's hooks on it do not run. Above the
        last layer the model's forward goes on to its final norm, given one example only.
        A call is (layer, args, kwargs): `layer(hidden, *args, **kwargs)` runs it. `masks`: this batch's
        `masks(attention_mask)`, made at collation, so that the model makes none of its own (making them reads the
        device); without them it makes its own from `attention_mask`."""
        calls: list = []
        entering: list = []
        last = len(self.layers) - 1

        def recorder(index):
            def record(layer, hidden, args, kwargs):
                if index == start:
                    entering.append(hidden)
                calls.append((layer, args, kwargs))
                return hidden[:1] if index == last else hidden     # GPT-2 reshapes it to (-1, T, d)
            return record

        handles = []
        try:
            for i, layer in enumerate(self.layers):
                if i >= start:
                    handles.append(add_hook(layer, StandIn(recorder(i))))
                elif prefix is not None:
                    handles.append(add_hook(layer, StandIn(lambda layer, hidden, args, kwargs: hidden)))
            with self._autocast():
                if prefix is None:
                    self._forward(input_ids, attention_mask, masks)
                else:
                    with handed(self.layers, attention_mask, masks, self.device) as given:
                        self.base(inputs_embeds=prefix.to(self.device), attention_mask=given, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if len(calls) != len(self.layers) - start:
            raise RuntimeError(f"node {self.spec.name!r}: the model's loop called {len(calls)} of its decoder "
                               f"layers {start}..{last}")
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

    def _forward(self, input_ids, attention_mask, masks: dict | None = None):
        """The base model's forward; with the embedding table on the host, the lookup happens there."""
        table = self.base.get_input_embeddings()
        with handed(self.layers, attention_mask, masks, self.device) as mask:
            if table.weight.device == self.device:
                return self.base(input_ids=input_ids.to(self.device), attention_mask=mask, use_cache=False)
            embeds = table(input_ids.to(table.weight.device)).to(self.device)
            return self.base(inputs_embeds=embeds, attention_mask=mask, use_cache=False)

    def frozen_tensors(self):
        """Every weight and buffer of the frozen model (for checks that training leaves them untouched)."""
        yield from self.model.state_dict().items()


def node_device(node_spec, run_device) -> torch.device:
    """Where a node computes: the device its spec names (`device: cuda:1`), else the run's. Activations cross to
    it at the edges into the node and back to the run's device (where everything trainable lives) at its reads."""
    if node_spec.device is None:
        return torch.device(run_device)
    if node_spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"node {node_spec.name!r}: device {node_spec.device} asked for, but no CUDA device is "
                        "available")
    return torch.device(node_spec.device)
