"""Plain text for the lm objective: the bundled OpenBookQA facts (`openbook-facts`), a .txt file (lines, packed into
passages), a .jsonl file with a "text" field, or hf:ORG/NAME[/CONFIG] (the column `text`, or --columns text=FIELD).
A file or the bundled facts give every tenth passage to `validation` and the rest to `train`; a hub data set has
its own splits."""
from __future__ import annotations

import json
from pathlib import Path

from .data import bundled_dir, parse_columns
from .errors import UserError

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
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict) or not isinstance(r.get("text"), str)),
                   None)
        if bad is not None:
            raise UserError(f"{path}: line {bad + 1}: expected an object with a \"text\" string")
        lines = [r["text"] for r in rows]
    else:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
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
