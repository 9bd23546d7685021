"""The decode loop in a process of its own (``scratchlm serve --decode process``).

Why: a decode thread and the event loop share one interpreter, so they take turns for the GIL.
The decode step releases it only inside its BLAS calls; the rest of the step (Python and small
NumPy calls), the sampling and the per-token bookkeeping hold it, and so do the event loop's
HTTP framing, JSON and chunking. Under load the two halves run one after the other, as if on one
core. In a process of its own the decode loop runs on one core while the HTTP side runs on
another: the server's throughput is the decode loop's.

``ProcessEngine`` is the event loop's side, with the ``BatchedDecoder`` methods the app calls
(``submit``, ``cancel``, ``stats``, ``start``, ``stop``). ``run_worker`` is the child: a
``BatchedDecoder`` driven turn by turn, whose rows' events go back in one message per turn.
The pipe carries, towards the child, ("submit", [(row id, row fields)]) and ("cancel", [row
ids]); back, (events [(row id, Event fields)], the engine's counters or None if unchanged).

The queue limit is kept on this side (the child's queue is unbounded): a row counts from its
``submit`` until its last event or its ``cancel``, so ``submit`` refuses exactly when the
engine would have (active + waiting rows over ``max_batch + max_queue``), without a round trip.
If the child dies, every open row gets an error event and later requests get one at once.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import select
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from scratchlm.serve.batching import Event, QueueFull, Row

_ROW_FIELDS = [f.name for f in dataclasses.fields(Row) if f.name not in ("sink", "cancelled")]
_EVENT_FIELDS = [f.name for f in dataclasses.fields(Event)]


class ProcessEngine:
    """A ``BatchedDecoder`` in a child process, seen from the event loop's process."""

    def __init__(self, run_dir, max_batch: int = 32, max_queue: int = 64, backend: str = "numpy",
                 blas_threads: int = 1):
        self.run_dir, self.backend, self.blas_threads = str(run_dir), backend, blas_threads
        self.max_batch, self.max_queue = max_batch, max_queue
        self.rows: dict[int, Row] = {}                         # open rows by id
        self.ids = itertools.count()
        self.lock = threading.Lock()                           # the open rows
        self.sending = threading.Lock()                        # the pipe's sending end
        self.counters = {"active": 0, "waiting": 0, "steps": 0, "tokens": 0, "prefills": 0, "rows_done": 0,
                         "rows_cancelled": 0, "errors": 0, "max_active": 0}
        self.process = self.conn = self.reader = None
        self.dead = None                                       # why the child is gone, once it is

    # ------------------------------------------------------------------ what the app calls
    def submit(self, rows: list[Row]) -> None:
        with self.lock:                                        # the open rows; the reader takes it too
            dead = self.dead
            if dead is None:
                if len(self.rows) + len(rows) > self.max_batch + self.max_queue:
                    raise QueueFull(f"{len(self.rows)} rows decoding or waiting (limit {self.max_batch} decoding "
                                    f"+ {self.max_queue} waiting)")
                for row in rows:
                    row.id, row.finished = next(self.ids), False
                    self.rows[row.id] = row
        if dead is not None:
            for row in rows:
                row.finished = False
            self._fail(rows)
            return
        # sent outside the lock: a send that waits for the child must not hold up the reader
        self._send("submit", [(row.id, {name: getattr(row, name) for name in _ROW_FIELDS}) for row in rows])

    def cancel(self, rows: list[Row]) -> None:
        with self.lock:
            ids = [row.id for row in rows if self.rows.pop(getattr(row, "id", None), None) is not None]
            for row in rows:
                row.cancelled = True
        if ids:
            self._send("cancel", ids)

    def _send(self, kind: str, body) -> None:
        with self.sending:
            if self.dead is None:
                try:
                    self.conn.send((kind, body))
                except OSError:                                # the child is gone: the reader fails the rows
                    pass

    def stats(self) -> dict:
        with self.lock:
            return {**self.counters, "max_batch": self.max_batch, "max_queue": self.max_queue}

    def start(self) -> "ProcessEngine":
        """Start the child (``python -m scratchlm.serve.worker``, the same scratchlm as this one)
        and wait until it has loaded the run. A fresh interpreter, not a fork of this process and
        its threads, and not multiprocessing's spawn, which imports the caller's main module again."""
        import scratchlm
        ours, theirs = socket.socketpair()
        package_root = str(Path(scratchlm.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scratchlm.serve.worker", str(theirs.fileno()), self.run_dir, str(self.max_batch),
             self.backend, str(self.blas_threads)], pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        try:
            ready = self.conn.recv()                           # the model is loaded (or why not)
        except EOFError:
            ready = f"it exited with status {self.process.wait()}"
        if ready != "ready":
            self.process.wait()
            raise RuntimeError(f"the decode process did not start: {ready}")
        self.reader = threading.Thread(target=self._read, name="scratchlm-decoder-events", daemon=True)
        self.reader.start()
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        self._send("stop", None)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.reader is not None:
            self.reader.join(timeout=10)
        self.conn.close()

    # ------------------------------------------------------------------ the child's messages
    def _read(self) -> None:
        """Hand each row's events to its sink (Reply.push: one loop wake-up for a whole message)."""
        try:
            while True:
                events, counters = self.conn.recv()
                with self.lock:
                    if counters is not None:
                        self.counters = counters
                    delivered = []
                    for row_id, fields in events:
                        row = self.rows.get(row_id)
                        if row is None:                              # cancelled meanwhile
                            continue
                        event = Event(*fields)
                        if event.kind != "token":
                            row.finished = True
                            del self.rows[row_id]
                        delivered.append((row, event))
                for row, event in delivered:
                    row.sink(event)
        except (EOFError, OSError):
            pass
        with self.lock:
            self.dead = "the decode process has stopped"
            open_rows, self.rows = list(self.rows.values()), {}
        self._fail(open_rows)

    def _fail(self, rows: list[Row]) -> None:
        for row in rows:
            if not row.finished:
                row.finished = True
                row.sink(Event("error", row.index, message=f"generation failed: {self.dead}"))


def run_worker(conn, run_dir: str, max_batch: int, backend_name: str, blas_threads: int) -> None:
    """The child: load the run, then admit, step and report, turn after turn, until told to stop."""
    from scratchlm import backend
    from scratchlm.runs import load_model
    from scratchlm.serve import limit_blas_threads
    from scratchlm.serve.batching import BatchedDecoder
    try:
        backend.use_backend(backend_name)
        limit_blas_threads(blas_threads)
        model, tokenizer, _ = load_model(run_dir)
        engine = BatchedDecoder(model, tokenizer, max_batch=max_batch, max_queue=1 << 30)   # the parent bounds it
    except Exception as exc:  # noqa: BLE001 -- told to the parent, which raises it
        conn.send(f"{type(exc).__name__}: {exc}")
        return
    conn.send("ready")
    model.eval()
    rows: dict[int, Row] = {}
    outbox: list = []
    sent = None

    def sink_of(row_id):
        def sink(event):
            outbox.append((row_id, [getattr(event, name) for name in _EVENT_FIELDS]))
            if event.kind != "token":
                rows.pop(row_id, None)
        return sink

    incoming = select.poll()                                   # made once: Connection.poll builds a selector per call
    incoming.register(conn.fileno(), select.POLLIN)
    while True:
        while incoming.poll(None if engine.idle() else 0):     # block only when there is nothing to decode
            try:
                kind, body = conn.recv()
            except EOFError:                                   # the server is gone
                return
            if kind == "stop":
                return
            if kind == "submit":
                new = [Row(**fields, sink=sink_of(row_id)) for row_id, fields in body]
                rows.update((row_id, row) for (row_id, _), row in zip(body, new))
                engine.submit(new)
            else:
                engine.cancel([rows.pop(row_id) for row_id in body if row_id in rows])
        engine.turn()
        stats = engine.stats()
        if outbox or stats != sent:
            conn.send((outbox, stats if stats != sent else None))
            outbox, sent = [], stats


if __name__ == "__main__":
    run_worker(Connection(int(sys.argv[1])), sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
