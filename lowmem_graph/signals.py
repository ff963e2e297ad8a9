"""Ctrl-C and SIGTERM during a run: the step under way finishes, then a checkpoint; a second signal stops at once."""
from __future__ import annotations

import signal
import threading


class StopSignals:
    """Ctrl-C and SIGTERM (what a job scheduler sends) end a run without losing it. Inside the training loop the
    first one lets the step under way finish, then a checkpoint is written; elsewhere (the frozen pass,
    evaluation), or at a second signal, the run stops at once and keeps its last checkpoint."""

    def __init__(self):
        self.received: int | None = None
        self.in_loop = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        first = self.received is None
        self.received = signum
        if not (first and self.in_loop):
            raise KeyboardInterrupt

    @property
    def signum(self) -> int:
        return self.received or signal.SIGINT

