"""The graph a user describes: nodes (frozen models and their roles), latent widths, output node.

Specs are YAML; two presets ship with the package (`tiny`, `paper`). Everything is validated here,
with errors that name the file and the field, so a typo never reaches model loading.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .errors import UserError

PRESETS = ("tiny", "paper", "paper-70b", "rc-coding")
# A frozen node's weight format: bitsandbytes NF4 (4-bit, double quantisation), bitsandbytes LLM.int8 (8-bit
# per-row weights, outlier columns of the input in 16-bit), or unquantised.
FORMATS = ("nf4", "int8", "bf16", "fp32")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")


def check_name(name, what: str) -> str:
    """Names that become folder names or keys: letters, digits, '_' and '-', starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(f"{what} {name!r} must be letters, digits, '_' and '-' (starting with a letter or digit, "
                        "at most 100 characters)")
    return name


MAX_YAML_BYTES = 1 << 20      # a spec, a protocol or a run's config is a few KiB; more is a mistake or an attack
_MAX_NODES = 100_000          # values after alias expansion ("billion laughs" expands 9 aliases to 10^9 values)
_MAX_DEPTH = 64               # nesting levels (deeper ends in a RecursionError somewhere downstream)


def read_yaml(path: Path):
    """A YAML file's content; too big, not UTF-8 (a byte-order mark is fine) or not YAML is one line naming the
    place."""
    with open(path, "rb") as f:
        data = f.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise UserError(f"{path}: over {MAX_YAML_BYTES >> 20} MiB, too big for a YAML spec or config")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text (byte {data[e.start]:#04x})") from None
    return parse_yaml(text, str(path))


class _TooBig(Exception):
    pass


def _expanded_size(node, depth: int = 0, memo: dict | None = None) -> int:
    """How many values `node` stands for once its aliases are expanded (each shared node counted once per use,
    computed once): what json or a deep copy of the parsed value would build."""
    memo = {} if memo is None else memo
    if depth > _MAX_DEPTH:
        raise _TooBig(f"nested more than {_MAX_DEPTH} levels deep")
    if id(node) not in memo:
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else
                    node.value if isinstance(node, yaml.SequenceNode) else [])
        memo[id(node)] = 1 + sum(_expanded_size(c, depth + 1, memo) for c in children)
        if memo[id(node)] > _MAX_NODES:
            raise _TooBig(f"over {_MAX_NODES:,} values once its aliases are expanded")
    return memo[id(node)]


def parse_yaml(text: str, where: str):
    """YAML text as Python values, with PyYAML's safe loader (no Python objects), refusing in one line what would
    hang or crash what reads it: nesting deeper than 64 levels (measured on the event stream, before the recursive
    composer sees it), aliases that expand past 100,000 values."""
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > _MAX_DEPTH:
                raise _TooBig(f"nested more than {_MAX_DEPTH} levels deep")
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _expanded_size(node)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        raise UserError(f"{where}:{at} invalid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") \
            from None
    except _TooBig as e:
        raise UserError(f"{where}: {e}") from None


def typed_fields(cls, raw, where: str, what: str = "field") -> dict:
    """`raw` checked against dataclass `cls`: unknown or missing keys named, every value of its field's type
    (an int where a float goes; a float written as text, like YAML's `1e-3`, is read as one; no bool for a number;
    None only where the field allows it). Returns the values to construct `cls` with."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise UserError(f"{where}: unknown {what}(s) {', '.join(map(str, unknown))} "
                        f"(allowed: {', '.join(sorted(fields))})")
    missing = [n for n, f in fields.items() if n not in raw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{where}: missing {what}(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in raw.items():
        out[name] = _typed(value, hints[name], f"{where}: {name}")
    return out


def _typed(value, hint, where: str):
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"{where}: a value is required, got nothing (null)")
    for kind in options:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and not isinstance(value, bool):
            number = value
            if isinstance(value, str):
                try:
                    number = float(value)
                except ValueError:
                    continue
            if isinstance(number, (int, float)):
                if not math.isfinite(number):
                    raise UserError(f"{where}: must be a finite number, got {value!r}")
                return float(number)
        if kind is str and isinstance(value, str):
            return value
        if typing.get_origin(kind) in (list, dict) or kind in (list, dict):
            if isinstance(value, typing.get_origin(kind) or kind):
                return value
        if dataclasses.is_dataclass(kind) and isinstance(value, (dict, kind)):
            return value
    names = " or ".join("nothing" if k is type(None) else getattr(k, "__name__", str(k)) for k in options)
    raise UserError(f"{where}: must be {names}, got {value!r} ({type(value).__name__})")


@dataclass
class NodeSpec:
    """One frozen model. Readers feed the shared latent; refiners receive it and feed the output node."""

    name: str
    model: str                      # hub id, local folder, llama2.c .bin, or tiny:<arch>
    role: str = "node"              # "reader" | "refiner"; "node" in a graph given by its edges
    prefix: str = ""                # framing text put before every input
    read_layer: int = -1            # readers: decoder layer whose output is read (1-based; negative from the top)
    pooling: str = "mean"           # readers: "mean" (masked) | "last" (last real token)
    inject_depth: float = 0.75      # refiners: relative depth of the injection (layer = round(depth * n_layers))
    blend: float = 0.25             # refiners: a in h <- (1-a) h + a * z_hat * ||h||
    tokenizer: str | None = None    # where the tokenizer lives, if not beside the model
    revision: str | None = None     # hub models: the branch, tag or commit to load (default: the hub's main)
    trust_remote_code: bool = False  # run Python that ships with the model (off: never asked, never run)
    quant: str | None = None        # this node's frozen format (one of FORMATS), if not the graph's
    device: str | None = None       # where this node computes (cuda:1, say), if not the run's device

    def format(self, graph_quant: str) -> str:
        """The node's frozen weight format: its own `quant`, else the graph's."""
        return self.quant or graph_quant

    def read_index(self, n_layers: int) -> int:
        """0-based index of the decoder layer whose output a reader reads (read_layer: 1-based, negative from the top)."""
        index = self.read_layer - 1 if self.read_layer > 0 else n_layers + self.read_layer
        if not 0 <= index < n_layers:
            raise UserError(f"node {self.name!r}: read_layer {self.read_layer} is outside 1..{n_layers} "
                            f"(or -1..-{n_layers})")
        return index

    def inject_index(self, n_layers: int) -> int:
        """0-based index of the decoder layer whose input a refiner's injection rewrites (at least one layer on
        each side): also the number of layers below the injection, which the prefix cache covers."""
        return min(max(round(self.inject_depth * n_layers), 1), n_layers - 1)


@dataclass
class OutputSpec:
    """Cross-attention output node: one learned query per answer slot attends over the refiners' tokens."""

    heads: int = 8
    max_choices: int = 5
    reads: list[str] = field(default_factory=list)   # a graph given by its edges: the nodes the output node reads


@dataclass
class GraphSpec:
    name: str
    nodes: list[NodeSpec]
    latent_dim: int = 1024          # shared latent of the readers (the paper: 1024)
    carry: str = "tied"             # "tied": refiner j receives W_j^T z (W_j its readout); "separate": own matrix
    injection: str = "pooled"       # "pooled": one latent vector per example | "token": aligned per token
    quant: str = "nf4"              # frozen weights, one of FORMATS
    max_length: int = 512
    output: OutputSpec = field(default_factory=OutputSpec)
    train: dict = field(default_factory=dict)   # training defaults a spec may carry (see train.TrainConfig)
    latents: list[dict] = field(default_factory=list)   # a graph of another shape than the paper's: its latents
    edges: list[dict] = field(default_factory=list)     # ... and edges (topology.py), run by edge_graph.py

    @property
    def readers(self) -> list[NodeSpec]:
        return [n for n in self.nodes if n.role == "reader"]

    @property
    def refiners(self) -> list[NodeSpec]:
        return [n for n in self.nodes if n.role == "refiner"]

    @property
    def by_edges(self) -> bool:
        """Whether the graph runs on the edge runtime (a shape other than the paper's)."""
        return bool(self.edges)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, raw, where: str):
    """Dataclass from a mapping: unknown or missing keys reported by name, every value of its field's type."""
    return cls(**typed_fields(cls, raw, where))


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise UserError(f"{where}: {message}")


def from_dict(raw: dict, source: str = "<spec>") -> GraphSpec:
    """Validate a parsed spec. `source` names the file in error messages."""
    raw = dict(raw or {})
    _check(isinstance(raw.get("nodes"), list) and raw["nodes"], source, "'nodes' must be a non-empty list")
    by_edges = bool(raw.get("edges") or raw.get("latents"))
    if by_edges:        # the edges form: the paper's shape becomes roles, any other keeps its edges
        from .topology import to_roles

        _check(all(isinstance(n, dict) and "name" in n for n in raw["nodes"]), source, "every node needs a name")
        roles = to_roles(raw, source)
        if roles is not None:
            raw, by_edges = roles, False
        else:
            raw = {**raw, "latents": [{"dim": raw.get("latent_dim", 1024), **lat} for lat in raw.get("latents") or []]}
    nodes = [_build(NodeSpec, n, f"{source}: nodes[{i}]") for i, n in enumerate(raw.pop("nodes"))]
    output = _build(OutputSpec, raw.pop("output", {}) or {}, f"{source}: output")
    spec = _build(GraphSpec, {**raw, "nodes": nodes, "output": output, "name": raw.get("name", Path(source).stem)},
                  source)
    check_name(spec.name, f"{source}: graph name")
    for i, n in enumerate(nodes):
        check_name(n.name, f"{source}: nodes[{i}]: node name")
    names = [n.name for n in nodes]
    _check(len(set(names)) == len(names), source, f"node names must be unique, got {names}")
    for i, n in enumerate(nodes):
        where = f"{source}: nodes[{i}] ({n.name})"
        if not by_edges:
            _check(n.role in ("reader", "refiner"), where, "role must be 'reader' or 'refiner' (or give the graph "
                   f"edges: see the edges form in the README), got {n.role!r}")
        _check(isinstance(n.model, str) and n.model.strip() != "", where, "model must name a hub id or path")
        _check(n.pooling in ("mean", "last"), where, f"pooling must be 'mean' or 'last', got {n.pooling!r}")
        _check(isinstance(n.read_layer, int) and n.read_layer != 0, where,
               f"read_layer must be a non-zero integer (1-based, negative counts from the top), got {n.read_layer!r}")
        _check(isinstance(n.inject_depth, (int, float)) and 0 < n.inject_depth < 1, where,
               f"inject_depth must be in (0, 1), got {n.inject_depth!r}")
        _check(isinstance(n.blend, (int, float)) and 0 <= n.blend <= 1, where,
               f"blend must be in [0, 1], got {n.blend!r}")
        _check(n.quant in (None, *FORMATS), where, f"quant must be one of {', '.join(FORMATS)}, got {n.quant!r}")
        _check(n.device is None or re.fullmatch(r"cpu|cuda(:\d+)?", n.device) is not None, where,
               f"device must be cpu, cuda or cuda:N, got {n.device!r}")
    # no readers is allowed: the refiners then feed the output node unsteered (the paper's learned-head baseline)
    _check(by_edges or spec.refiners != [], source, "the graph needs at least one node with role 'refiner'")
    _check(isinstance(spec.latent_dim, int) and spec.latent_dim > 0, source, "latent_dim must be a positive integer")
    _check(spec.carry in ("tied", "separate"), source, f"carry must be 'tied' or 'separate', got {spec.carry!r}")
    _check(spec.injection in ("pooled", "token"), source,
           f"injection must be 'pooled' or 'token', got {spec.injection!r}")
    _check(spec.quant in FORMATS, source, f"quant must be one of {', '.join(FORMATS)}, got {spec.quant!r}")
    _check(isinstance(spec.max_length, int) and spec.max_length >= 8, source, "max_length must be an integer >= 8")
    _check(spec.output.heads >= 1, f"{source}: output", f"heads must be >= 1, got {spec.output.heads}")
    _check(spec.latent_dim % spec.output.heads == 0, f"{source}: output",
           f"latent_dim {spec.latent_dim} must be divisible by heads {spec.output.heads}")
    _check(2 <= spec.output.max_choices <= 26, f"{source}: output", "max_choices must be in [2, 26]")
    _check(isinstance(spec.train, dict), source, "train must be a mapping")
    return spec


def load_spec(path: str | Path) -> GraphSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"graph file not found: {path}")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a YAML mapping with a 'nodes' list")
    return from_dict(raw, str(path))


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return Path(str(resources.files("lowmem_graph.presets") / f"{name}.yaml"))


def load_preset(name: str) -> GraphSpec:
    return load_spec(preset_path(name))
