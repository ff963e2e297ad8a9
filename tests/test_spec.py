import pytest

from lowmem_graph.errors import UserError
from lowmem_graph.spec import PRESETS, load_preset, load_spec

GOOD = """
name: mine
latent_dim: 16
nodes:
  - {name: a, model: "tiny:llama", role: reader}
  - {name: b, model: "tiny:phi3", role: refiner}
"""


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "rc-coding"])   # rc-coding: test_rc_source.py
def test_presets_load_with_paper_defaults(name):
    spec = load_preset(name)
    assert len(spec.readers) == 3 and len(spec.refiners) == 2
    assert all(n.inject_depth == 0.75 and n.blend == 0.25 for n in spec.refiners)
    if name == "paper":
        assert spec.latent_dim == 1024 and spec.quant == "nf4"


def test_yaml_file_with_defaults(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(GOOD)
    spec = load_spec(path)
    assert spec.name == "mine" and spec.latent_dim == 16
    assert spec.refiners[0].inject_depth == 0.75 and spec.refiners[0].blend == 0.25
    assert spec.readers[0].pooling == "mean" and spec.carry == "tied"


@pytest.mark.parametrize("text, expected", [
    ("nodes: [\n  {name: a\n", "line"),                                           # bad YAML: says where
    (GOOD.replace("latent_dim: 16", "latent_dim: 16\ncolour: red"), "unknown field(s) colour"),
    (GOOD.replace("role: reader", "role: writer"), "role must be 'reader' or 'refiner'"),
    (GOOD.replace("role: refiner", "role: reader"), "at least one node with role 'refiner'"),
    (GOOD.replace("role: reader}", "role: reader, pooling: max}"), "pooling must be"),
    (GOOD.replace("role: refiner}", "role: refiner, blend: 1.5}"), "blend must be in [0, 1]"),
    (GOOD.replace("role: refiner}", "role: refiner, inject_depth: 1}"), "inject_depth must be in (0, 1)"),
    (GOOD.replace("name: b", "name: a"), "unique"),
    (GOOD.replace("latent_dim: 16", "latent_dim: 15"), "divisible by heads"),
    (GOOD.replace('  - {name: a, model: "tiny:llama", role: reader}\n', "  - {name: a, role: reader}\n"),
     "missing field(s) model"),
    ("- just a list\n", "expected a YAML mapping"),
])
def test_bad_specs_name_file_and_problem(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_spec(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_missing_file_and_unknown_preset(tmp_path):
    with pytest.raises(UserError, match="graph file not found"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        load_preset("huge")
