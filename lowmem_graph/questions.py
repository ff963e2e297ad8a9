"""A multiple-choice question, and rows of data turned into one: the `Question` every source gives, the one prompt
format, the checks every source shares (text where text goes, 2 to 5 choices, an answer naming one of them), the
generic format (JSONL or CSV with a header; see data.py) and ARC's row shape, and files read line by line so that
every malformed row is one `UserError` naming its file and line. Where the rows come from (official files, the hub,
a task's splits) is data.py's.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

LETTERS = "ABCDE"
MAX_LINE = 1 << 20    # bytes a data row may take: a question is never a megabyte; a broken file can be one line


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    choices: tuple[str, ...]
    label: int  # index into choices; -1 when unknown (a question asked of a trained graph)
    subject: str = ""  # MMLU subject, "" otherwise
    context: str = ""  # a passage the question refers to, shown before it


def format_prompt(q: Question) -> str:
    """One prompt format for every task, lettered by position so numeric ARC labels read like the rest."""
    lines = [q.context, f"Question: {q.question}"] if q.context else [f"Question: {q.question}"]
    lines += [f"{letter}. {text}" for letter, text in zip(LETTERS, q.choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def load_file(path: str | Path, need_answer: bool = True) -> list[Question]:
    """Questions of one file: JSONL (the generic format or ARC/OpenBookQA's) or CSV with a header (generic).
    Without `need_answer` (asking a trained graph) a row may leave out its answer."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"no file at {path}")
    if path.suffix == ".csv":
        questions = _load_generic_csv(path, need_answer)
    else:
        questions = []
        for where, row in _json_rows(path):
            if isinstance(row, dict) and isinstance(row.get("question"), dict):
                questions.append(_arc_row(row, where, need_answer))
            else:
                questions.append(generic_question(row, where, f"{path.stem}-{len(questions)}", need_answer))
    if not questions:       # an empty file is a mistake, never "nothing to do"
        raise UserError(f"{path}: no questions in it (the file is empty)")
    return questions


def _load_generic_csv(path: Path, need_answer: bool) -> list[Question]:
    text = "".join(line for _, line in _lines(path))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    questions, start = [], 2
    try:
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if None in row:
                raise UserError(f"{where}: more fields than the header's {len(reader.fieldnames)}")
            if "choices" not in row and "A" in row:
                row["choices"] = [row[c] for c in LETTERS if row.get(c) not in (None, "")]
            elif isinstance(row.get("choices"), str):
                try:
                    row["choices"] = json.loads(row["choices"])
                except json.JSONDecodeError:
                    raise UserError(f"{where}: 'choices' must be a JSON list (\"[\"\"a\"\", ...]\") or one "
                                    "column per choice named A, B, C, ...") from None
            questions.append(generic_question(row, where, f"{path.stem}-{len(questions)}", need_answer))
    except csv.Error as e:
        raise UserError(f"{path}:{start}: bad CSV ({e})") from None
    return questions


def generic_question(row, where: str, default_id: str, need_answer: bool = True, labels=None) -> Question:
    """A row of the generic format; `answer` a letter, a 0-based index or the text of a choice (or, with
    `labels`, one of those labels)."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with question, choices and answer, got {type(row).__name__}")
    texts = _field(row, "choices", where)
    if not isinstance(texts, (list, tuple)):
        raise UserError(f"{where}: 'choices' must be a list of texts, got {type(texts).__name__}")
    texts = [str(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else t for t in texts]
    answer = row.get("answer")
    known = answer is not None and answer != ""
    if not known and need_answer:
        raise UserError(f"{where}: missing field 'answer' (a letter, a 0-based index or the answer's text)")
    label = _answer_index(answer, texts, labels, where) if known else None
    qid = row.get("id")
    return _question(default_id if qid in (None, "") else qid, _field(row, "question", where), texts,
                     range(len(texts)), label, where, str(row.get("subject") or ""), str(row.get("context") or ""),
                     need_answer=known)


def _answer_index(answer, texts, labels, where: str) -> int:
    """The 0-based index an answer names: a label (hub data with `labels`), an int index, or a string that is a
    letter, a choice's text or a 0-based index; a string that names two different choices is refused."""
    if labels is not None and answer in labels:
        return list(labels).index(answer)
    if isinstance(answer, bool):
        raise UserError(f"{where}: answer {answer!r} is not a letter, an index or a choice's text")
    if isinstance(answer, int):
        if 0 <= answer < len(texts):
            return answer
        raise UserError(f"{where}: answer index {answer} is out of range for {len(texts)} choices (0-based)")
    if isinstance(answer, str):
        a = answer.strip()
        readings = {}
        if len(a) == 1 and a.upper() in LETTERS[:len(texts)]:
            readings["a letter"] = LETTERS.index(a.upper())
        if a in texts:
            readings["a choice's text"] = texts.index(a)
        if a.isdigit() and int(a) < len(texts):
            readings["an index"] = int(a)
        if len(set(readings.values())) > 1:
            raise UserError(f"{where}: answer {a!r} is ambiguous: " + " / ".join(
                f"as {how} it names choice {LETTERS[i]}" for how, i in readings.items()) + "; give its letter")
        if readings:
            return next(iter(readings.values()))
        if a.isdigit():
            raise UserError(f"{where}: answer index {a} is out of range for {len(texts)} choices (0-based)")
    raise UserError(f"{where}: answer {answer!r} is not a letter (A-{LETTERS[max(len(texts), 1) - 1]}), a 0-based "
                    "index or the text of a choice"[:300])


def _question(qid, stem, texts, labels, answer, where: str, subject: str = "", context: str = "",
              need_answer: bool = True) -> Question:
    """The checks every source shares: text where text goes, 2 to 5 choices, an answer that names one of them
    (unless `need_answer` is off: the label is then -1)."""
    if not isinstance(stem, str) or not stem.strip():
        raise UserError(f"{where}: the question text is {'empty' if isinstance(stem, str) else repr(stem)}")
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise UserError(f"{where}: every choice must be text, got {texts!r}"[:300])
    if not 2 <= len(texts) <= 5:
        raise UserError(f"{where}: {len(texts)} choices, expected 2 to 5")
    if not need_answer:
        return Question(str(qid), stem, tuple(texts), -1, subject, context)
    if answer not in labels:
        raise UserError(f"{where}: answer {answer!r} is not among the choice labels {list(labels)}")
    return Question(str(qid), stem, tuple(texts), list(labels).index(answer), subject, context)


def _arc_row(row, where: str, need_answer: bool = True) -> Question:
    q = _field(row, "question", where)
    choices = _field(q, "choices", where)
    if not isinstance(choices, list):
        raise UserError(f"{where}: 'choices' is not a list")
    texts = [_field(c, "text", where) for c in choices]
    labels = [_field(c, "label", where) for c in choices]
    known = need_answer or row.get("answerKey") not in (None, "")
    return _question(_field(row, "id", where), _field(q, "stem", where), texts, labels,
                     _field(row, "answerKey", where) if known else None, where, need_answer=known)


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


def _json_rows(path: Path):
    """(where, parsed row) of every non-blank line of a JSON-lines file."""
    for line_no, line in _lines(path):
        if line.strip():
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: bad JSON ({e.msg})") from None
