"""The Hugging Face hub both ways, for exported graphs (predict.export_run's folders): a model card header the hub
reads (base models, data sets, licence, tags, library), an upload (`export RUN --push-to-hub ORG/NAME`), and a
download by hub id (`TrainedGraph("ORG/NAME")`, `predict ORG/NAME`) that loads only after the export's SHA-256
check. Through huggingface_hub's own calls: HfApi.create_repo, HfApi.upload_folder, snapshot_download."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from .errors import UserError, hub_error

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")      # ORG/NAME, as the hub spells a repository


def is_repo_id(ref) -> bool:
    """ORG/NAME that is no local path: a local folder of that name wins, and so does a local ORG folder (a mistyped
    `runs/<run>` is a missing run folder, never a download)."""
    return (isinstance(ref, str) and bool(_REPO_ID.match(ref)) and not Path(ref).expanduser().exists()
            and not Path(ref.split("/")[0]).expanduser().is_dir())


def check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise UserError(f"--push-to-hub {repo_id!r}: expected a hub repository id ORG/NAME (letters, digits, "
                        "'-', '_', '.')")


def card_header(spec, cfg, license: str = "other") -> str:
    """The YAML block the hub reads at the top of README.md: the frozen nodes from the hub as base_model, the
    training data sets, the licence, tags and library_name."""
    from .data import HUB_DATASETS, task_part
    from .loading import _HUB_ID

    base = [n.model for n in spec.nodes if _HUB_ID.match(n.model) and not n.model.startswith((".", "/", "~"))
            and not Path(n.model).expanduser().exists()]
    datasets = []
    for part in cfg.task.split("+"):
        task = task_part(part)[0]
        name = HUB_DATASETS.get(task) or ("/".join(task[3:].split("/")[:2]) if task.startswith("hf:") else None)
        if name and name not in datasets:
            datasets.append(name)
    choice = cfg.objective == "choice"
    meta = {"library_name": "lowmem-graph", "license": license, "base_model": list(dict.fromkeys(base)),
            "datasets": datasets, "pipeline_tag": "multiple-choice" if choice else "text-generation",
            "tags": ["lowmem-graph", "graph-of-models", "frozen-base-models", "multiple-choice" if choice else "lm"]}
    meta = {k: v for k, v in meta.items() if v != []}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder as the hub repository's whole content (files the folder lacks are deleted there);
    the repository is made if new. Returns the commit's URL."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), delete_patterns="*",
                                   commit_message=f"lowmem-graph export ({Path(folder).name})")
    except Exception as e:         # the hub's and httpx's errors share no base class: hub_error tells them apart
        raise hub_error(f"repository {repo_id!r}", e, local="export to a folder and push it later") from None
    return getattr(commit, "commit_url", str(commit))


def download_graph(repo_id: str) -> Path:
    """An exported graph on the hub as a local folder of real files (LOWMEM_GRAPH_CACHE/graphs/ORG--NAME, kept in
    step with the repository), refused unless it is an export: its export.json carries the weights' SHA-256."""
    from huggingface_hub import snapshot_download

    from .tiny import cache_root

    local = cache_root() / "graphs" / repo_id.replace("/", "--")
    try:
        snapshot_download(repo_id=repo_id, local_dir=str(local))
    except Exception as e:
        raise hub_error(f"graph {repo_id!r}", e, local="give a local folder (lowmem-graph export makes one)") from None
    if not (local / "export.json").is_file():
        raise UserError(f"{repo_id} on the hub is not a lowmem-graph export (no export.json): push one with "
                        "lowmem-graph export RUN --push-to-hub ORG/NAME")
    return local
