"""The node cache's NF4 copy quantised module by module (quantise.py): the files from_pretrained + save_pretrained
write, byte for byte, with about one module in host memory."""
import filecmp
import shutil

import pytest
import torch

from lowmem_graph import quantise
from lowmem_graph.loading import _save_atomically, load_config, node_key, source_identity
from lowmem_graph.nodes import FrozenNode
from lowmem_graph.spec import NodeSpec
from lowmem_graph.tiny import ALL_ARCHS

from conftest import shared_data


def _old_way(source, compute, device, path, key):
    """What FrozenNode.load did before: the whole model quantised by from_pretrained, saved by save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quantise.quantiser_config(compute),
                                                 dtype=compute, device_map={"": device})
    _save_atomically(model, AutoTokenizer.from_pretrained(source), path, key)


def _new_way(source, compute, device, path, key):
    from transformers import AutoTokenizer

    config, _, _ = load_config(source)
    assert quantise.save_quantised(source, True, None, config, compute, torch.device(device), path, key,
                                   AutoTokenizer.from_pretrained(source))


def _same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert "model.safetensors" in names and "checksums.json" in names
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def _stories(tmp_path):
    from lowmem_graph.llama2c import convert_llama2c

    folder = shared_data() / "models" / "stories260K"
    if not (folder / "stories260K.bin").is_file():
        pytest.skip("stories260K not found")
    return convert_llama2c(folder / "stories260K.bin", tmp_path / "stories260K")


def _bf16_checkpoint(tmp_path):
    """A checkpoint stored in bf16 (as hub models are) quantised for fp32 compute: the cast comes first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem_graph.tiny import tiny_path

    model = AutoModelForCausalLM.from_pretrained(tiny_path("mistral"), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    AutoTokenizer.from_pretrained(tiny_path("mistral")).save_pretrained(tmp_path / "bf16")
    return tmp_path / "bf16"


def _sharded_checkpoint(tmp_path):
    """A checkpoint in several files with an index (as 7B models ship)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem_graph.tiny import tiny_path

    AutoModelForCausalLM.from_pretrained(tiny_path("gemma2")).save_pretrained(tmp_path / "sharded",
                                                                             max_shard_size="200KB")
    AutoTokenizer.from_pretrained(tiny_path("gemma2")).save_pretrained(tmp_path / "sharded")
    assert len(quantise.checkpoint_files(str(tmp_path / "sharded"), True)) > 1
    return tmp_path / "sharded"


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model", [*ALL_ARCHS, "stories260K", "bf16-checkpoint", "sharded"])
def test_module_by_module_writes_the_copy_from_pretrained_writes(tmp_path, model, compute):
    """Every tiny architecture (GPT-2's Conv1D transposed, tied and untied heads), the real stories260K (tied),
    a bf16 checkpoint, a sharded one; fp32 compute (a CPU run) and bf16 (a GPU run's host node, quantised here on the CPU)."""
    from lowmem_graph.loading import resolve_model

    made = {"stories260K": _stories, "bf16-checkpoint": _bf16_checkpoint, "sharded": _sharded_checkpoint}
    source = str(made[model](tmp_path)) if model in made else resolve_model(f"tiny:{model}")[0]
    key = node_key(source_identity(source, True), "nf4", compute)
    _old_way(source, compute, "cpu", tmp_path / "old", key)
    _new_way(source, compute, "cpu", tmp_path / "new", key)
    _same_files(tmp_path / "old", tmp_path / "new")


def test_one_module_in_memory_at_a_time(tmp_path, monkeypatch):
    """The point of it: while a module is quantised, no other module of the model holds a real tensor."""
    from transformers import AutoTokenizer

    from lowmem_graph.loading import resolve_model

    source = resolve_model("tiny:llama")[0]
    models, held = [], []
    skeleton, materialise = quantise.skeleton, quantise._materialise

    def keep(*args, **kwargs):
        models.append(skeleton(*args, **kwargs))
        return models[-1]

    def real(module):
        return any(t is not None and t.device.type != "meta"
                   for t in [*module._parameters.values(), *module._buffers.values()])

    def watch(module, attr, *args, **kwargs):
        materialise(module, attr, *args, **kwargs)
        held.append({id(m) for m in models[0].modules() if real(m)} <= {id(module)})

    monkeypatch.setattr(quantise, "skeleton", keep)
    monkeypatch.setattr(quantise, "_materialise", watch)
    config, _, _ = load_config(source)
    assert quantise.save_quantised(source, True, None, config, torch.float32, torch.device("cpu"), tmp_path / "q",
                                   {"cache": "nodes"}, AutoTokenizer.from_pretrained(source))
    assert len(held) == len(quantise._saved_names(models[0])) and all(held)
    assert not (tmp_path / "q" / quantise.SCRATCH).exists()


def _checkpoint_copy(tmp_path, arch="qwen2"):
    from lowmem_graph.tiny import tiny_path

    folder = tmp_path / arch
    shutil.copytree(tiny_path(arch), folder)
    (folder / "checksums.json").unlink()
    return folder


def test_frozen_node_load_quantises_module_by_module_and_reloads(tmp_path, monkeypatch):
    """FrozenNode.load's first run goes through quantise.py (from_pretrained is never asked to quantise), and the
    node it gives computes as the old path's node does."""
    import transformers

    folder = _checkpoint_copy(tmp_path)
    asked = []
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        asked.append("quantization_config" in kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    node = FrozenNode.load(NodeSpec(name="q", model=str(folder), role="reader"), "nf4", "cpu", 64)
    assert asked == [False]
    monkeypatch.undo()
    ids = node.encode(["Which gas do plants take in?"])
    states = node.final(ids["input_ids"], ids["attention_mask"])
    config, source, _ = load_config(str(folder))
    key = node_key(source_identity(source, True), "nf4", torch.float32)
    _old_way(source, torch.float32, "cpu", tmp_path / "old", key)
    old = FrozenNode.load(NodeSpec(name="o", model=str(tmp_path / "old"), role="reader"), "nf4", "cpu", 64)
    assert torch.equal(states, old.final(ids["input_ids"], ids["attention_mask"]))


def test_a_checkpoint_this_path_cannot_read_goes_the_old_way(tmp_path):
    """A .bin checkpoint (no safetensors) and one whose keys are not the model's: from_pretrained quantises them,
    and nothing half-written is left in the node cache."""
    from safetensors.torch import load_file, save_file

    from lowmem_graph.loading import _quantised_cache_dir, resolve_model

    pickled = _checkpoint_copy(tmp_path / "a")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    assert quantise.checkpoint_files(str(pickled), True) is None
    renamed = _checkpoint_copy(tmp_path / "b")
    tensors = load_file(renamed / "model.safetensors")
    tensors["transformer." + next(iter(tensors))] = tensors.pop(next(iter(tensors)))
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})
    config, source, _ = load_config(str(renamed))
    from transformers import AutoTokenizer

    assert not quantise.save_quantised(source, True, None, config, torch.float32, torch.device("cpu"),
                                       tmp_path / "out", {"cache": "nodes"}, AutoTokenizer.from_pretrained(source))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.tmp"))
    node = FrozenNode.load(NodeSpec(name="p", model=str(pickled), role="reader"), "nf4", "cpu", 64)
    source = resolve_model(str(pickled))[0]
    assert _quantised_cache_dir(source_identity(source, True), source, "nf4").is_dir()
    assert node.n_layers == 4


def test_a_packed_weight_brought_back_is_the_weight_quantised_there():
    """What the CUDA path relies on, checked where it can be: Params4bit quantises where `.to(device)` sends it,
    and moving the quantised weight (with its nested statistics) to the CPU keeps every saved entry."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    linear = bnb.nn.Linear4bit(96, 40, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                               quant_type="nf4", device="meta")
    weight = torch.randn(40, 96)
    quantised = bnb.nn.Params4bit(weight, requires_grad=False, **linear.weight.__dict__).to("cpu")
    assert quantised.bnb_quantized and quantised.quant_state.nested
    direct, moved = {}, {}
    linear.weight = quantised
    linear._save_to_state_dict(direct, "", False)
    linear.weight = quantised.to("cpu")
    linear._save_to_state_dict(moved, "", False)
    assert direct.keys() == moved.keys() and all(torch.equal(direct[k], moved[k]) for k in direct)
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(direct["weight"], packed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_on_cuda_module_by_module_equals_the_old_cuda_and_the_cpu_copy(tmp_path, arch):
    """Quantised on the GPU (bf16 compute, the run's own setting) module by module: the copy from_pretrained
    writes on that GPU, and the one the CPU writes for a host node under a plan (the same cache key)."""
    from lowmem_graph.loading import resolve_model

    source = resolve_model(f"tiny:{arch}")[0]
    key = node_key(source_identity(source, True), "nf4", torch.bfloat16)
    _old_way(source, torch.bfloat16, "cuda", tmp_path / "old", key)
    _new_way(source, torch.bfloat16, "cuda", tmp_path / "new", key)
    _new_way(source, torch.bfloat16, "cpu", tmp_path / "cpu", key)
    _same_files(tmp_path / "old", tmp_path / "new")
    _same_files(tmp_path / "cpu", tmp_path / "new")


def test_a_hub_checkpoint_is_read_from_the_hub_cache_at_its_commit(tmp_path, monkeypatch):
    """A hub id's files come through transformers' cached_file at the commit the node resolved to (offline here,
    from a local hub cache; online, that call is the first run's download)."""
    import huggingface_hub.constants

    from lowmem_graph.tiny import tiny_path

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--lowmem-test--tiny-phi3"
    for commit in ("a" * 40, "b" * 40):
        shutil.copytree(tiny_path("phi3"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    found = quantise.checkpoint_files("lowmem-test/tiny-phi3", False, "a" * 40)
    assert found == [repo / "snapshots" / ("a" * 40) / "model.safetensors"]
    calls, write = [], quantise.quantise_to_folder
    monkeypatch.setattr(quantise, "quantise_to_folder", lambda *args, **kw: calls.append(args[:3]) or write(*args,
                                                                                                            **kw))
    node = FrozenNode.load(NodeSpec(name="h", model="lowmem-test/tiny-phi3", role="reader", revision="a" * 40),
                           "nf4", "cpu", 64)
    assert node.identity.startswith("lowmem-test/tiny-phi3@" + "a" * 40)
    assert calls == [("lowmem-test/tiny-phi3", "a" * 40, found)]
