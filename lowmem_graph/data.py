"""Multiple-choice data: ARC, OpenBookQA and MMLU from official local files or the Hugging Face hub, your own files
in a generic format, and any hub data set through a column mapping.

Every source is turned into the same `Question`, with the answer as a 0-based index, and every malformed row is
reported as a `UserError` naming the file and line, so a bad download fails at load time and not mid-training.

The generic format, JSONL or CSV with a header: `question`, `choices` and `answer`, optional `id` and `context`.
`choices` is a list (in CSV a JSON list, or one column per choice named A, B, C, ...); `answer` is a letter, a
0-based index or the answer's text. A task names such data by path: a file, or a folder of split files
(`train.jsonl`, `validation.jsonl` or `dev.jsonl`, `test.jsonl`, or the same in CSV). A hub data set is
`hf:ORG/NAME` (or `hf:ORG/NAME/CONFIG`), its columns mapped with `question=...,choices=...,answer=...` (dotted
paths reach nested fields: `choices=choices.text,labels=choices.label`).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from pathlib import Path

from lowmem_graph.errors import UserError, hub_error
from lowmem_graph.questions import Question, _arc_row, _json_rows, _lines, _question, generic_question, load_file

TASKS = ("arc-challenge", "arc-easy", "openbookqa", "mmlu")
HUB_DATASETS = {"arc-challenge": "allenai/ai2_arc", "arc-easy": "allenai/ai2_arc", "openbookqa": "allenai/openbookqa",
                "mmlu": "cais/mmlu"}       # where each named task lives on the hub
SPLITS = ("train", "validation", "test")
MMLU_SPLITS = ("auxiliary_train", "dev", "validation", "test")

# Split -> file or folder name in each official release.
_ARC_FILES = {"train": "Train", "validation": "Dev", "test": "Test"}
_OBQA_FILES = {"train": "train", "validation": "dev", "test": "test"}
_MMLU_DIRS = {"auxiliary_train": "auxiliary_train", "dev": "dev", "validation": "val", "test": "test"}


def leave_out_trained(evaluated: list[Question], trained: list[Question]) -> list[Question]:
    """The evaluated questions that are not also training questions (same id, text and choices): a protocol may
    train on a split it also evaluates on (the paper's draws from MMLU's validation split), and a question scored
    after being trained on inflates the accuracy."""
    seen = {(q.id, q.question, q.choices) for q in trained}
    return [q for q in evaluated if (q.id, q.question, q.choices) not in seen]


def bundled_dir() -> Path:
    """ARC-Easy (train, dev and test) ships with the package so the default job and its evaluation run offline."""
    return Path(__file__).resolve().parent / "bundled"


def load_task(
    task: str,
    split: str,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    subjects: Iterable[str] | str | None = None,
    columns: str | None = None,
) -> list[Question]:
    """Load one split; local files when data_dir is given, else the hub (bundled files for ARC-Easy); a task may
    also be a path (the generic format) or `hf:ORG/NAME` with `columns`. `limit` draws across MMLU's subjects."""
    split = "validation" if split in ("val", "dev") and task != "mmlu" else split
    if task.startswith("hf:"):
        questions = _load_hub_mapped(task[3:], split, columns)
        return questions if limit is None else spread(questions, limit)
    if is_path_task(task):
        path = Path(task).expanduser()
        questions = load_file(_split_file(path, split) if path.is_dir() else path)
        return questions if limit is None else spread(questions, limit)
    if columns:
        raise UserError(f"--columns maps a hub data set's columns (--task hf:ORG/NAME), not {task}")
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}, a file or folder of your own "
                        "(question, choices, answer: see the README), or hf:ORG/NAME")
    split = "validation" if split == "val" else split
    valid = MMLU_SPLITS if task == "mmlu" else SPLITS
    if task == "mmlu" and split == "train":
        raise UserError("mmlu has no train split: train on mmlu:auxiliary_train (its 99,842 questions from other "
                        "benchmarks), or on mmlu:dev,validation")
    if split not in valid:
        raise UserError(f"unknown split {split!r} for {task}: choose one of {', '.join(valid)} ('val' = validation)")
    if isinstance(subjects, str):
        subjects = [subjects]
    if subjects and task != "mmlu":
        raise UserError(f"subjects only apply to mmlu, not {task}")
    if subjects and split == "auxiliary_train":
        raise UserError("mmlu auxiliary_train has no subjects: drop the subject filter")
    if limit is not None and limit < 0:
        raise UserError(f"limit must be >= 0, got {limit}")

    if data_dir is None and task == "arc-easy":
        data_dir = bundled_dir()
    if data_dir is None:
        questions = _load_hub(task, split, subjects)
    elif task == "mmlu":
        questions = _load_mmlu_dir(Path(data_dir), split, subjects)
    else:
        questions = _load_jsonl(_find_jsonl(Path(data_dir), task, split))
    return questions if limit is None else spread(questions, limit)


def spread(questions: list[Question], limit: int) -> list[Question]:
    """At most `limit` questions, drawn in turn from each subject (MMLU's files come sorted by subject, so its
    first N rows would all be abstract algebra); the order within a subject is kept."""
    by_subject: dict[str, list[Question]] = {}
    for q in questions:
        by_subject.setdefault(q.subject, []).append(q)
    if len(by_subject) < 2:
        return questions[:limit]
    drawn, queues = [], [iter(qs) for qs in by_subject.values()]
    while len(drawn) < limit and queues:
        for queue in list(queues):
            q = next(queue, None)
            if q is None:
                queues.remove(queue)
            elif len(drawn) < limit:
                drawn.append(q)
    return drawn


def is_path_task(task: str) -> bool:
    """A task given as a path to data of one's own (a file in the generic format or a folder of split files), not
    a named task nor a hub data set (`hf:`), whatever folders the current directory holds."""
    if task.startswith("hf:") or task in TASKS:
        return False
    return task.endswith((".jsonl", ".csv")) or "/" in task or Path(task).expanduser().exists()


def task_part(part: str) -> tuple[str, list[str], str]:
    """`task[:split,split...][@N]` -> (task, splits, N); the task may be `hf:ORG/NAME[/CONFIG]` or a path (an
    existing one is taken whole, ':' and '@' included)."""
    part = part.strip()
    if is_path_task(part) and Path(part).expanduser().exists():
        return part, [], ""
    part, _, sample = part.rpartition("@") if re.search(r"@[^/@]*$", part) else (part, "", "")
    prefix, rest = ("hf:", part[3:]) if part.startswith("hf:") else ("", part)
    task, _, splits = rest.partition(":")
    return prefix + task, [s.strip() for s in splits.split(",") if s.strip()], sample


_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "dev", "val"), "test": ("test",)}


def _split_file(folder: Path, split: str) -> Path:
    names = _SPLIT_NAMES.get(split, (split,))
    for name in names:
        for ext in (".jsonl", ".csv"):
            if (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    raise UserError(f"{folder}: no {split} file ({', '.join(n + '.jsonl' for n in names)} or .csv)")


def _find_jsonl(data_dir: Path, task: str, split: str) -> Path:
    if task == "openbookqa":
        name, sub = f"{_OBQA_FILES[split]}.jsonl", "openbookqa"
    else:
        name, sub = f"ARC-{task[4:].capitalize()}-{_ARC_FILES[split]}.jsonl", "arc"
    candidates = [data_dir / name, data_dir / sub / name]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"{task} {split}: no file at {candidates[0]} or {candidates[1]}")


def _load_jsonl(path: Path) -> list[Question]:
    """ARC and OpenBookQA share one row shape: {"id", "question": {"stem", "choices"}, "answerKey"}."""
    return [_arc_row(row, where) for where, row in _json_rows(path)]


def _load_mmlu_dir(data_dir: Path, split: str, subjects) -> list[Question]:
    name = _MMLU_DIRS[split]
    candidates = [data_dir / "data" / name, data_dir / name, data_dir / "mmlu" / "data" / name]
    folder = next((d for d in candidates if d.is_dir()), None)
    if folder is None:
        raise UserError(f"mmlu {split}: no folder at {', '.join(map(str, candidates))}")
    if split == "auxiliary_train":  # rows from other benchmarks, in files without a subject suffix
        files = [(path, "") for path in sorted(folder.glob("*.csv"))]
    elif subjects:
        files = [(folder / f"{s}_{name}.csv", s) for s in sorted(set(subjects))]
        for path, _ in files:
            if not path.is_file():
                raise UserError(f"mmlu {split}: no file at {path}")
    else:
        suffix = f"_{name}.csv"
        files = [(path, path.name[: -len(suffix)]) for path in sorted(folder.glob(f"*{suffix}"))]
    if not files:
        raise UserError(f"mmlu {split}: no CSV files in {folder}")
    return [q for path, subject in files for q in _load_mmlu_csv(path, subject)]


def _load_mmlu_csv(path: Path, subject: str) -> list[Question]:
    """Headerless rows question,A,B,C,D,answer; quoted fields may span lines, so errors cite a row's first line."""
    questions = []
    text = "".join(line for _, line in _lines(path))
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise UserError(f"{path}:{start}: bad CSV ({e})") from None
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if not row:
            continue
        if len(row) != 6:
            raise UserError(f"{where}: {len(row)} columns, expected 6 (question,A,B,C,D,answer)")
        qid = f"{path.stem}-{len(questions)}"
        questions.append(_question(qid, row[0], row[1:5], tuple("ABCD"), row[5].strip(), where, subject))
    return questions


def _hub_rows(name: str, config: str | None, split: str, local: str = "give a local file"):
    """The rows of a hub data set's split; `datasets` is optional, so it is imported only here. Every failure is
    one line: no network, gated, no such data set, no such split."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"loading {name} from the Hugging Face hub needs the datasets package: pip install "
                        "\"lowmem-graph[hub]\" (in a clone: pip install -e \".[hub]\"), or give local files") from None
    what = f"data set {name}" + (f" ({config})" if config else "")
    try:
        return datasets.load_dataset(name, config, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise UserError(f"{what} has no split {split!r}: {str(e).splitlines()[0][:200]}") from None
        raise hub_error(what, e, local) from None
    except (OSError, ConnectionError, TimeoutError) as e:
        raise hub_error(what, e, local) from None
    except Exception as e:      # datasets' own errors (DatasetNotFoundError, ...) share no base class with the above
        if type(e).__module__.split(".")[0] in ("datasets", "huggingface_hub", "fsspec"):
            raise hub_error(what, e, local) from None
        raise


def _load_hub_mapped(ref: str, split: str, columns: str | None) -> list[Question]:
    """`hf:ORG/NAME[/CONFIG]` with a column mapping (see the module's docstring)."""
    parts = ref.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UserError(f"hf:{ref}: expected hf:ORG/NAME or hf:ORG/NAME/CONFIG")
    mapping = parse_columns(columns)
    name, config = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    questions = []
    for i, row in enumerate(_hub_rows(name, config, split)):
        where = f"hf:{ref} {split} row {i}"
        mapped = {key: _dotted(row, path, where) for key, path in mapping.items() if key != "labels"}
        labels = _dotted(row, mapping["labels"], where) if "labels" in mapping else None
        questions.append(generic_question(mapped, where, f"{name.replace('/', '_')}-{split}-{i}", labels=labels))
    return questions


COLUMN_KEYS = ("question", "choices", "answer", "labels", "id", "context", "subject")


def parse_columns(columns: str | None) -> dict[str, str]:
    """`question=q,choices=options.text,answer=label` -> our field -> the data set's (dotted) column."""
    mapping = {"question": "question", "choices": "choices", "answer": "answer"}
    for item in filter(None, (c.strip() for c in (columns or "").split(","))):
        key, eq, path = item.partition("=")
        if not eq or key.strip() not in COLUMN_KEYS or not path.strip():
            raise UserError(f"--columns {item!r}: expected FIELD=COLUMN with FIELD one of {', '.join(COLUMN_KEYS)}")
        mapping[key.strip()] = path.strip()
    return mapping


def _dotted(row, path: str, where: str):
    value = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise UserError(f"{where}: no column {path!r} (columns: {', '.join(map(str, row))})"[:300])
        value = value[key]
    return value


OFFICIAL = "pass --data-dir with the official files"


def _load_hub(task: str, split: str, subjects) -> list[Question]:
    """Hub ids of the official data."""
    if task == "mmlu":
        configs = sorted(set(subjects)) if subjects else ["all"]
        rows = [row for config in configs for row in _hub_rows(HUB_DATASETS[task], config, split, OFFICIAL)]
        counts: dict[str, int] = {}
        questions = []
        for i, row in enumerate(rows):
            subject = row["subject"]
            n = counts.get(subject, 0)
            counts[subject] = n + 1
            qid = f"{subject}_{_MMLU_DIRS[split]}-{n}" if subject else f"{split}-{i}"
            where = f"cais/mmlu {split} row {i}"
            choices = row["choices"]
            questions.append(_question(qid, row["question"], choices, range(len(choices)), row["answer"], where,
                                       subject))
        return questions
    if task == "openbookqa":
        name, config, stem_key = HUB_DATASETS[task], "main", "question_stem"
    else:
        name, config, stem_key = HUB_DATASETS[task], f"ARC-{task[4:].capitalize()}", "question"
    return [
        _question(row["id"], row[stem_key], row["choices"]["text"], row["choices"]["label"], row["answerKey"],
                  f"{name} {config} {split} row {i}")
        for i, row in enumerate(_hub_rows(name, config, split, OFFICIAL))
    ]
