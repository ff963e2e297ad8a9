"""Progress that shows wherever the output goes: a tqdm bar on a terminal; without one (a log file, a batch
scheduler), where a bar stays silent, a line every tenth of the way or every 30 seconds, whichever comes first."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator


class Lines:
    """A bar's news as lines: `update(done)` after each unit, printed when a tenth of `total` or `seconds` passed."""

    fraction, seconds = 0.1, 30.0

    def __init__(self, total: int, what: str, first: int = 0, log=None):
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.total, self.what, self.first = total, what, first       # `first`: units done before a resume
        self.every = max(1, round(total * self.fraction))
        self.started = self.last = time.time()

    def update(self, done: int, note: str = "") -> None:
        now = time.time()
        if done % self.every and now - self.last < self.seconds and done != self.total:
            return
        self.last = now
        rate = (now - self.started) / max(done - self.first, 1)
        self.log(f"{self.what} {done}/{self.total}{' ' + note if note else ''} | {now - self.started:.0f} s, "
                 f"~{rate * (self.total - done):.0f} s left")


def progress(iterable: Iterable, total: int, what: str, enabled: bool = True, log=None) -> Iterator:
    """`iterable` with a bar on a terminal, lines elsewhere (see Lines), nothing when not `enabled`."""
    from tqdm.auto import tqdm

    bar = tqdm(iterable, total=total, desc=what, disable=None if enabled else True, leave=False)
    lines = Lines(total, what, log=log) if enabled and bar.disable else None
    for done, item in enumerate(bar, 1):
        yield item
        if lines is not None:
            lines.update(done)
