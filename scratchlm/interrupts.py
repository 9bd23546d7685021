"""Ctrl-C during training, made safe: the first one becomes a flag the training loop reads between
iterations (so the checkpoint it then saves is never a half-applied optimizer step); a second one
interrupts at once. ``scratchlm.train.Trainer.fit`` runs inside ``DeferredInterrupt()``; with several
ranks the flag is agreed on once per iteration (``scratchlm.distributed``)."""
from __future__ import annotations

import signal


class DeferredInterrupt:
    """Turn the first Ctrl-C into a flag the loop reads between iterations, so the checkpoint it saves
    is never a half-applied optimizer step. A second Ctrl-C interrupts at once (no save)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:          # not the main thread: Ctrl-C stays a plain KeyboardInterrupt
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
