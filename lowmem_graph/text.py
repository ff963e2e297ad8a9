"""Plain text for the lm objective: the bundled OpenBookQA facts (`openbook-facts`), a .txt file (lines, packed into
passages), a .jsonl file with a "text" field, or hf:ORG/NAME[/CONFIG] (the column `text`, or --columns text=FIELD).
A file or the bundled facts give every tenth passage to `validation` and the rest to `train`; a hub data set has
its own splits."""
from __future__ import annotations

from pathlib import Path

from .data import bundled_dir, parse_columns
from .errors import UserError
from .questions import _json_rows, _lines

BUNDLED = {"openbook-facts": "openbook.txt"}
PASSAGE_CHARS = 256          # lines are packed into passages of about this many characters


def load_text(task: str, split: str, limit: int | None = None, columns: str | None = None) -> list[tuple[str, str]]:
    """(id, passage) pairs of a text task's split: "train", "validation", or "all" (a file given for evaluation)."""
    if task.startswith("hf:"):
        return _hub_text(task[3:], split, limit, columns)
    if task in BUNDLED:
        path = bundled_dir() / BUNDLED[task]
    else:
        path = Path(task).expanduser()
        if not path.is_file():
            raise UserError(f"text task {task!r}: no such file (give a .txt or .jsonl file, hf:ORG/NAME, or "
                            f"{', '.join(BUNDLED)})")
    if path.suffix == ".jsonl":     # read as the questions' files are: a bad line (not UTF-8, not JSON) named
        lines = []
        for where, row in _json_rows(path):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UserError(f"{where}: expected an object with a \"text\" string")
            lines.append(row["text"])
    else:
        lines = [line for _, line in _lines(path)]
    passages = pack(lines)
    if not passages:
        raise UserError(f"{path}: no text")
    if split not in ("train", "validation", "all"):
        raise UserError(f"{task}: a text file has the splits train and validation (every tenth passage), got "
                        f"{split!r}")
    items = [(f"{path.stem}:{i}", p) for i, p in enumerate(passages)
             if split == "all" or (i % 10 == 9) == (split == "validation")]
    return items[:limit] if limit else items


def pack(lines: list[str], chars: int = PASSAGE_CHARS) -> list[str]:
    """Consecutive non-empty lines joined into passages of about `chars` characters (a line is never cut); a
    line in double quotes (OpenBookQA's facts) loses them."""
    passages, current = [], ""
    for line in lines:
        line = line.strip()
        if len(line) >= 2 and line[0] == line[-1] == '"':
            line = line[1:-1].strip()
        if not line:
            continue
        current = f"{current} {line}" if current else line
        if len(current) >= chars:
            passages.append(current)
            current = ""
    return passages + ([current] if current else [])


def _hub_text(ref: str, split: str, limit: int | None, columns: str | None) -> list[tuple[str, str]]:
    from .data import _dotted, _hub_rows

    parts = ref.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UserError(f"hf:{ref}: expected hf:ORG/NAME or hf:ORG/NAME/CONFIG")
    field = parse_columns(columns).get("text", "text") if columns else "text"
    rows = _hub_rows("/".join(parts[:2]), parts[2] if len(parts) == 3 else None, split)
    items = [(f"{ref}:{split}:{i}", str(_dotted(row, field, f"hf:{ref} row {i}"))) for i, row in enumerate(rows)]
    items = [item for item in items if item[1].strip()]
    return items[:limit] if limit else items
