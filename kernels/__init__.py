"""Our Triton kernels. They install as `lowmem_graph.kernels`; this folder is never the top-level `kernels`.

bitsandbytes and transformers run `from kernels import ...` for Hugging Face's kernels hub. Wherever a checkout's
root is on sys.path (a script or `python -c` run there, `python -m pytest`, `python -m lowmem_graph.cli`), Python
finds this folder first under that name. Imported so, it steps aside: the `kernels` found on the rest of the path
takes its place in sys.modules (CPython's import returns what a module leaves there), or, where there is none,
`import kernels` fails as it would without this folder.
"""
if __name__ == "kernels":
    import importlib.util
    import sys
    from importlib.machinery import PathFinder
    from pathlib import Path

    _root = Path(__file__).resolve().parents[1]
    del sys.modules["kernels"]
    _spec = PathFinder.find_spec("kernels", [p for p in sys.path if Path(p or ".").resolve() != _root])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _hub = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _hub
    try:
        _spec.loader.exec_module(_hub)
    except BaseException:
        del sys.modules["kernels"]
        raise
