"""A CPU model of the streamer's CUDA ordering: a copy issued on the copy stream lands only when the compute stream
waits on an event recorded after it (or the copy stream is synchronised), and its target reads as garbage until
then. A missing or misplaced wait makes the compute read poisoned slot bytes, so its numbers differ from the plain
run's; on the CPU the real copies land at once and no test could tell."""
import contextlib
import threading

import torch

from lowmem_graph.memory import stream


class DeferredCopies:
    """`install(monkeypatch)` patches torch and returns a LayerStreamer subclass that takes the CUDA branch on the
    CPU."""

    def __init__(self, late_source: bool = False):
        """`late_source`: a copy reads its source when it lands, as on CUDA (a source overwritten before then, a
        disk group's staging buffer, gives the wrong bytes); by default a snapshot is taken when it is issued."""
        self.pending = []           # (sequence number, target, source or its snapshot)
        self.issued = 0
        self.late_source = late_source
        self._where = threading.local()     # the reader thread copies too, never on the copy stream
        self._lock = threading.RLock()
        self._copy = torch.Tensor.copy_

    @property
    def on_copy_stream(self) -> bool:
        return getattr(self._where, "copy_stream", False)

    @on_copy_stream.setter
    def on_copy_stream(self, value: bool) -> None:
        self._where.copy_stream = value

    def land(self, upto: int) -> None:
        with self._lock:
            for entry in [p for p in self.pending if p[0] <= upto]:
                self._copy(entry[1], entry[2])
                self.pending.remove(entry)

    def install(self, monkeypatch):
        model = self

        class Event:
            issued = None

            def record(self, stream):
                assert isinstance(stream, CopyStream), "a copy's event is recorded on the copy stream"
                self.issued = model.issued

            def synchronize(self):
                model.land(self.issued)

        class CopyStream:
            def wait_stream(self, other):
                pass                # compute work is synchronous on the CPU: nothing to wait for

            def synchronize(self):
                model.land(model.issued)

        class ComputeStream:
            def wait_event(self, event):
                assert event.issued is not None, "waits on an event that was never recorded"
                model.land(event.issued)

        def copy_(target, source, non_blocking=False):
            if not model.on_copy_stream:
                return model._copy(target, source, non_blocking=non_blocking)
            assert non_blocking, "a copy on the copy stream must not block the host"
            with model._lock:
                model.issued += 1
                model.pending.append((model.issued, target, source if model.late_source else source.clone()))
                return model._copy(target, torch.full_like(target, 0x7F))     # garbage until it lands

        @contextlib.contextmanager
        def on_copy_stream(_):
            model.on_copy_stream = True
            try:
                yield
            finally:
                model.on_copy_stream = False

        compute = ComputeStream()
        monkeypatch.setattr(torch.Tensor, "copy_", copy_)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
        monkeypatch.setattr(torch.cuda, "stream", on_copy_stream)
        monkeypatch.setattr(torch.cuda, "Event", Event)     # events the streamer makes as it goes (disk staging)

        class Streamer(stream.LayerStreamer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                if self.order:
                    self._stream, self._ready = CopyStream(), [Event() for _ in self.slots]

        monkeypatch.setattr(stream, "LayerStreamer", Streamer)
        return Streamer
