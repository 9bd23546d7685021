"""The HTTP side of ``scratchlm serve``: a Starlette app over a ``BatchedDecoder``.

Each generation request is checked (``protocol.parse_job``), split into rows (one per prompt and
choice), queued on the engine, and answered from the engine's events: as one JSON object, or as
server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``). The engine runs in its own
thread (or, with ``threaded=False``, as a task of the event loop; or in a child process,
``worker.ProcessEngine``); its events cross into the event loop through ``Reply`` (a
lock-protected list; a wake-up only for a handler that waits, and one ``LoopWaker`` hand-off for
all the handlers a decode step wakes, not one per token).

What ends a request early, and how it is answered:
- the client disconnects (watched while waiting for the next event): its rows are cancelled and
  leave the batch before the next decode step, freeing their slots;
- the request runs past ``timeout`` seconds (queueing included): its rows are cancelled; the
  answer is 504 ``timeout`` if nothing was sent yet, else (a stream already under way) a last
  event ``data: {"error": {...}}`` and the stream ends, without ``[DONE]``;
- the queue is full: 429 ``queue_full`` with ``Retry-After``, before anything is queued.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from scratchlm.serve.batching import BatchedDecoder, Event, QueueFull, Row
from scratchlm.serve.protocol import (ApiError, Choice, Job, chunk_object, parse_job, response_object,
                                      usage_chunk)

PAGE = Path(__file__).with_name("page.html")
MAX_BODY_BYTES = 1 << 20


class Disconnected(Exception):
    """The client went away."""


class TimedOut(Exception):
    """The request ran past its deadline."""


class LoopWaker:
    """Wakes request handlers from the engine's thread with one ``call_soon_threadsafe`` (one write
    to the event loop's self-pipe, one wake-up of the loop) for all the replies that became ready
    while the loop was busy, not one per reply: a decode step of 16 rows ends in one hand-off."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.thread = loop, threading.get_ident()
        self.lock = threading.Lock()
        self.pending: list[asyncio.Event] = []

    def wake(self, ready: asyncio.Event) -> None:
        if threading.get_ident() == self.thread:        # the engine runs in the loop (--decode loop)
            ready.set()
            return
        with self.lock:
            self.pending.append(ready)
            if len(self.pending) > 1:                    # a hand-off is already on its way
                return
        try:
            self.loop.call_soon_threadsafe(self._set)
        except RuntimeError:                             # the loop is closed: nobody is listening
            pass

    def _set(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for ready in pending:
            ready.set()


class Reply:
    """A request's events, handed from the engine thread to the event loop.

    One asyncio.Event wakes the handler for new events, the deadline (one timer per request) and
    a disconnect (the watcher task): no task or timer per token. An event wakes the handler only
    when it waits for one (``waiting``): a stream that sleeps through its ``--stream-interval``
    finds the tokens of the interval when it comes back, with no wake-up in between."""

    def __init__(self, waker: LoopWaker, deadline: float, receive=None):
        self.waker = waker
        self.lock = threading.Lock()
        self.events: list[Event] = []
        self.ready = asyncio.Event()
        self.waiting = self.pausing = self.timed_out = self.disconnected = False
        self.timer = waker.loop.call_at(deadline, self._time_out)
        self.watcher = None if receive is None else asyncio.ensure_future(self._watch(receive))

    def push(self, event: Event) -> None:            # the engine's thread: the loop's, or its own
        with self.lock:
            self.events.append(event)
            if not (self.waiting or (self.pausing and event.kind != "token")):
                return
            self.waiting = self.pausing = False      # one wake-up for the events until the next wait
        self.waker.wake(self.ready)

    async def pause(self, seconds: float) -> None:
        """Let tokens gather for up to ``seconds`` (a stream's interval between writes); a row's end
        or error, a disconnect or the deadline ends the pause at once, so the last chunk (and the
        client's next request) does not wait out the interval."""
        with self.lock:
            if any(event.kind != "token" for event in self.events):
                return
            self.ready.clear()
            self.pausing = True
        timer = self.waker.loop.call_later(seconds, self.ready.set)
        try:
            await self.ready.wait()
        finally:
            timer.cancel()
            with self.lock:
                self.pausing = False

    def _time_out(self) -> None:
        self.timed_out = True
        self.ready.set()

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        self.ready.set()

    def close(self) -> None:
        self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()

    async def next_events(self) -> list[Event]:
        """The events that came since the last call; waits for at least one."""
        while True:
            with self.lock:
                events, self.events = self.events, []
                self.waiting = not events
                self.ready.clear()
            if self.disconnected:
                raise Disconnected()
            if self.timed_out:
                raise TimedOut()
            if events:
                return events
            await self.ready.wait()


class EventStream:
    """An ASGI response that sends server-sent events from an async iterator of batches of chunks
    (lists of dicts or strings; one ``data:`` event each) and closes the iterator whatever happens
    (its ``finally`` frees the engine's rows). A batch goes out in one write: the events that
    arrived while the loop was busy cost one system call, not one per token."""

    def __init__(self, chunks):
        self.chunks = chunks

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        try:
            async for batch in self.chunks:
                body = "".join(f"data: {chunk if isinstance(chunk, str) else _dumps(chunk)}\n\n" for chunk in batch)
                await send({"type": "http.response.body", "body": body.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:                                      # the client went away while we wrote
            pass
        finally:
            await self.chunks.aclose()


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _flush_text(batch: list, run, job: Job, name: str) -> None:
    """Append the chunk of a run of plain-text tokens of one choice (their texts joined), if any."""
    if run is not None and any(run[1]):
        batch.append(chunk_object(job, name, run[0], "".join(run[1])))


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class Server:
    """The app's state: model, tokenizer, engine and settings; ``app`` is the Starlette app."""

    def __init__(self, model, tokenizer, model_name: str, engine: BatchedDecoder, api_key: str | None = None,
                 timeout: float = 60.0, threaded: bool = True, stream_interval: float = 0.0):
        self.model, self.tokenizer, self.model_name, self.engine = model, tokenizer, model_name, engine
        self.api_key, self.timeout, self.threaded = api_key, timeout, threaded
        self.stream_interval = stream_interval   # seconds a stream waits after a write, gathering tokens
        self.block_size = model.config.block_size
        self.waker = None
        routes = [Route("/", self.page), Route("/health", self.health),
                  Route("/v1/models", self.models), Route("/v1/models/{model_id:path}", self.model_info),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]
        handlers = {ApiError: self._api_error, HTTPException: self._http_error, Exception: self._server_error}
        self.app = Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        """The engine runs as long as the server: in the event loop (default), or in its own thread."""
        if self.threaded:
            self.engine.start()
            try:
                yield
            finally:
                self.engine.stop()
            return
        work = asyncio.Event()
        self.engine.on_work = work.set
        driver = asyncio.ensure_future(self._drive(work))
        try:
            yield
        finally:
            driver.cancel()
            self.engine.on_work = None

    async def _drive(self, work: asyncio.Event) -> None:
        """Run the engine's turns in the event loop, between its I/O (``--decode loop``): one
        Python thread, so no GIL hand-offs between the decode step (which releases the GIL in
        every BLAS call) and the loop; but also no overlap of the two on a second core."""
        engine = self.engine
        engine.model.eval()
        while True:
            if engine.idle():
                work.clear()
                await work.wait()
                continue
            engine.turn()
            await asyncio.sleep(0)                   # send what the step produced, take new requests

    def _waker(self) -> LoopWaker:
        """The running loop's waker (one per loop; a test may run the app in a fresh loop)."""
        loop = asyncio.get_running_loop()
        if self.waker is None or self.waker.loop is not loop:
            self.waker = LoopWaker(loop)
        return self.waker

    # ------------------------------------------------------------------ errors
    async def _api_error(self, request, exc: ApiError):
        return error_response(exc)

    async def _http_error(self, request, exc: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=kind))

    async def _server_error(self, request, exc: Exception):
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error",
                                       code="internal_error"))

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>' (the key given to "
                           "scratchlm serve --api-key)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # ------------------------------------------------------------------ small endpoints
    async def page(self, request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(self, request):
        dead = getattr(self.engine, "dead", None)           # a --decode process child that has died: 503
        return JSONResponse({"status": "ok" if dead is None else "error", "model": self.model_name,
                             "block_size": self.block_size, "vocab_size": self.tokenizer.vocab_size,
                             "api_key_required": self.api_key is not None, "engine": self.engine.stats(),
                             **({"message": dead} if dead else {})}, status_code=200 if dead is None else 503)

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "scratchlm",
                "context_length": self.block_size}

    async def models(self, request):
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request):
        self._authorize(request)
        if request.path_params["model_id"] != self.model_name:
            raise ApiError(404, f"no model {request.path_params['model_id']!r} here; this server has "
                           f"{self.model_name!r}", code="model_not_found", param="model")
        return JSONResponse(self._model_card())

    # ------------------------------------------------------------------ generation
    async def completions(self, request):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request):
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool):
        self._authorize(request)
        job = parse_job(await _read_json(request), self.tokenizer, self.block_size, chat)
        waker = self._waker()
        reply = Reply(waker, waker.loop.time() + self.timeout, request.receive)
        rows = [Row(prompt, job.max_tokens, job.temperature, job.top_k, job.top_p, job.repetition_penalty,
                    job.seed + j, job.stops, job.logprobs if job.want_logprobs else None, p * job.n + j,
                    reply.push)
                for p, prompt in enumerate(job.prompts) for j in range(job.n)]
        try:
            self.engine.submit(rows)
        except QueueFull as exc:
            reply.close()
            raise ApiError(429, f"the server is busy ({exc}); retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        choices = [Choice(i, "" if job.echo_texts is None else job.echo_texts[i // job.n]) for i in range(len(rows))]
        if not job.stream:
            try:
                await self._collect(reply, choices)
            finally:
                self._close(rows, reply)
            return JSONResponse(response_object(job, self.model_name, choices, self.tokenizer))
        try:
            first = await reply.next_events()           # errors before the first token keep their status
        except BaseException as exc:
            self._close(rows, reply)
            raise _as_api_error(exc) from None
        if any(e.kind == "error" for e in first):
            self._close(rows, reply)
            raise ApiError(500, next(e.message for e in first if e.kind == "error"), type="server_error",
                           code="generation_failed")
        return EventStream(self._chunks(job, reply, first, choices, rows))

    async def _collect(self, reply: Reply, choices: list[Choice]) -> None:
        open_rows = len(choices)
        while open_rows:
            try:
                events = await reply.next_events()
            except (TimedOut, Disconnected) as exc:
                raise _as_api_error(exc) from None
            for event in events:
                if event.kind == "error":
                    raise ApiError(500, event.message, type="server_error", code="generation_failed")
                choices[event.index].add(event)
                open_rows -= event.kind == "done"

    async def _chunks(self, job: Job, reply: Reply, events: list[Event], choices: list[Choice], rows):
        """The stream's chunks, a batch per wake-up of the handler; its ``finally`` cancels whatever
        rows are still generating."""
        name, tokenizer = self.model_name, self.tokenizer
        try:
            if job.chat:
                yield [chunk_object(job, name, choice.index, None, role=True) for choice in choices]
            elif job.echo_texts is not None:
                yield [chunk_object(job, name, choice.index, choice.text) for choice in choices]
            open_rows, produced = len(choices), 0
            while True:
                batch, run = [], None             # run: [index, texts] of adjacent plain-text tokens of one choice
                for event in events:
                    if event.kind == "error":
                        batch.append(ApiError(500, event.message, type="server_error", code="generation_failed").body())
                        yield batch
                        return
                    offset = len(choices[event.index].text)
                    choices[event.index].add(event)
                    if event.kind == "token" and event.logprob is None:
                        if run is not None and run[0] == event.index:
                            run[1].append(event.text)
                            continue
                        _flush_text(batch, run, job, name)
                        run = [event.index, [event.text]]
                        continue
                    _flush_text(batch, run, job, name)
                    run = None
                    if event.kind == "token":     # with log-probabilities: one chunk per token (the page's bars)
                        items = [(event.token, event.logprob, event.top, offset)]
                        batch.append(chunk_object(job, name, event.index, event.text, None, items, tokenizer))
                    else:
                        open_rows -= 1
                        produced += event.completion_tokens
                        batch.append(chunk_object(job, name, event.index, event.text or ("" if not job.chat else None),
                                                  event.finish_reason))
                _flush_text(batch, run, job, name)
                if not open_rows:
                    break
                if batch:
                    yield batch
                    if self.stream_interval:  # let the next tokens gather: one write (and one chunk) for several
                        await reply.pause(self.stream_interval)
                try:
                    events = await reply.next_events()
                except TimedOut as exc:
                    yield [_as_api_error(exc).body()]
                    return
            if job.include_usage:
                batch.append(usage_chunk(job, name, produced))
            yield batch + ["[DONE]"]
        except Disconnected:
            return
        finally:
            self._close(rows, reply)

    def _close(self, rows, reply: Reply) -> None:
        self.engine.cancel([row for row in rows if not getattr(row, "finished", False)])
        reply.close()


def _as_api_error(exc: BaseException) -> BaseException:
    if isinstance(exc, TimedOut):
        return ApiError(504, "the request took longer than the server's timeout (scratchlm serve --timeout); "
                        "ask for fewer tokens or retry", type="timeout_error", code="timeout")
    if isinstance(exc, Disconnected):
        return ApiError(499, "the client closed the connection", code="client_closed")
    return exc


async def _read_json(request: Request):
    """The request body as JSON; 413 past MAX_BODY_BYTES, 400 if it is not JSON."""
    size, parts = 0, []
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
