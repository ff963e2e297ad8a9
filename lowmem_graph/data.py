"""Multiple-choice data sets (ARC, OpenBookQA, MMLU) from official local files or the Hugging Face hub.

Every source is turned into the same `Question`, with the answer as a 0-based index, and every malformed row is
reported as a `UserError` naming the file and line, so a bad download fails at load time and not mid-training.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lowmem_graph.errors import UserError

TASKS = ("arc-challenge", "arc-easy", "openbookqa", "mmlu")
SPLITS = ("train", "validation", "test")
MMLU_SPLITS = ("auxiliary_train", "dev", "validation", "test")
LETTERS = "ABCDE"
MAX_LINE = 1 << 20    # bytes a data row may take: a question is never a megabyte; a broken file can be one line

# Split -> file or folder name in each official release.
_ARC_FILES = {"train": "Train", "validation": "Dev", "test": "Test"}
_OBQA_FILES = {"train": "train", "validation": "dev", "test": "test"}
_MMLU_DIRS = {"auxiliary_train": "auxiliary_train", "dev": "dev", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    choices: tuple[str, ...]
    label: int  # index into choices
    subject: str = ""  # MMLU subject, "" otherwise


def bundled_dir() -> Path:
    """ARC-Easy train and dev ship with the package so the default job runs offline."""
    return Path(__file__).resolve().parent / "bundled"


def format_prompt(q: Question) -> str:
    """One prompt format for every task, lettered by position so numeric ARC labels read like the rest."""
    lines = [f"Question: {q.question}"]
    lines += [f"{letter}. {text}" for letter, text in zip(LETTERS, q.choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def load_task(
    task: str,
    split: str,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    subjects: Iterable[str] | str | None = None,
) -> list[Question]:
    """Load one split; local files when data_dir is given, else the hub (bundled files for ARC-Easy train/dev)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    split = "validation" if split == "val" else split
    valid = MMLU_SPLITS if task == "mmlu" else SPLITS
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

    if data_dir is None and task == "arc-easy" and split != "test":
        data_dir = bundled_dir()
    if data_dir is None:
        questions = _load_hub(task, split, subjects)
    elif task == "mmlu":
        questions = _load_mmlu_dir(Path(data_dir), split, subjects)
    else:
        questions = _load_jsonl(_find_jsonl(Path(data_dir), task, split))
    return questions if limit is None else questions[:limit]


def _question(qid, stem, texts, labels, answer, where: str, subject: str = "") -> Question:
    """The checks every source shares: text where text goes, 2 to 5 choices, an answer that names one of them."""
    if not isinstance(stem, str) or not stem.strip():
        raise UserError(f"{where}: the question text is {'empty' if isinstance(stem, str) else repr(stem)}")
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise UserError(f"{where}: every choice must be text, got {texts!r}"[:300])
    if not 2 <= len(texts) <= 5:
        raise UserError(f"{where}: {len(texts)} choices, expected 2 to 5")
    if answer not in labels:
        raise UserError(f"{where}: answer {answer!r} is not among the choice labels {list(labels)}")
    return Question(str(qid), stem, tuple(texts), list(labels).index(answer), subject)


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


def _field(obj, key: str, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(f"{where}: missing field {key!r}")
    return obj[key]


def _lines(path: Path):
    """(line number, text) of a UTF-8 file (a byte-order mark is fine); a line that is not UTF-8 or over MAX_LINE
    bytes is one error naming its line, read without holding more than MAX_LINE of it."""
    with open(path, "rb") as f:
        line_no = 0
        while True:
            raw = f.readline(MAX_LINE + 1)
            if not raw:
                return
            line_no += 1
            if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
                size = len(raw)
                while chunk := f.readline(1 << 20):      # measure the rest without keeping it
                    size += len(chunk)
                    if chunk.endswith(b"\n"):
                        break
                raise UserError(f"{path}:{line_no}: a line of {size / 2 ** 20:.1f} MiB, over the "
                                f"{MAX_LINE // 2 ** 20} MiB a row may take")
            try:
                yield line_no, raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{line_no}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1})") from None


def _load_jsonl(path: Path) -> list[Question]:
    """ARC and OpenBookQA share one row shape: {"id", "question": {"stem", "choices"}, "answerKey"}."""
    questions = []
    for line_no, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: bad JSON ({e.msg})") from None
        q = _field(row, "question", where)
        choices = _field(q, "choices", where)
        if not isinstance(choices, list):
            raise UserError(f"{where}: 'choices' is not a list")
        texts = [_field(c, "text", where) for c in choices]
        labels = [_field(c, "label", where) for c in choices]
        questions.append(
            _question(_field(row, "id", where), _field(q, "stem", where), texts, labels,
                      _field(row, "answerKey", where), where)
        )
    return questions


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


def _load_hub(task: str, split: str, subjects) -> list[Question]:
    """Hub ids of the same data; `datasets` is optional, so it is imported only here."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"loading {task} from the Hugging Face hub needs the datasets package: "
            "pip install 'lowmem-graph[hub]' or pass --data-dir with the official files"
        ) from None
    if task == "mmlu":
        configs = sorted(set(subjects)) if subjects else ["all"]
        rows = [row for config in configs for row in datasets.load_dataset("cais/mmlu", config, split=split)]
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
        name, config, stem_key = "allenai/openbookqa", "main", "question_stem"
    else:
        name, config, stem_key = "allenai/ai2_arc", f"ARC-{task[4:].capitalize()}", "question"
    return [
        _question(row["id"], row[stem_key], row["choices"]["text"], row["choices"]["label"], row["answerKey"],
                  f"{name} {config} {split} row {i}")
        for i, row in enumerate(datasets.load_dataset(name, config, split=split))
    ]
