"""``scratchlm serve --run DIR``: a trained run behind an OpenAI-compatible HTTP API and a web page.

    pip install 'scratchlm[serve]'            # starlette + uvicorn
    scratchlm serve --run runs/demo           # http://127.0.0.1:8000/ : the page
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "The list type", "max_tokens": 40, "temperature": 0}'

    from openai import OpenAI                 # the official client, unchanged
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="demo", prompt="The ", max_tokens=40)
    client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], stream=True)

Endpoints (OpenAI's shapes; ``app.py``, ``protocol.py``):

- ``POST /v1/completions``: ``prompt`` (string, list of strings, token ids, or lists of ids),
  ``max_tokens`` (default 16), ``temperature`` (default 1; 0 = greedy), ``top_p``, ``stop`` (up to
  4 strings), ``seed``, ``n`` (choices per prompt), ``stream``, ``stream_options.include_usage``,
  ``logprobs`` (0-20 alternatives per token), ``echo``. Extensions: ``top_k`` (0 = off) and
  ``repetition_penalty`` (1 = off), as ``scratchlm sample``.
- ``POST /v1/chat/completions``: ``messages`` become one prompt by the chat template of
  ``scratchlm chat`` (``protocol.chat_prompt``: system text + blank line, user text + newline,
  assistant text + blank line); the reply ends at a blank line or ``<|endoftext|>``. ``max_tokens``
  (or ``max_completion_tokens``) defaults to the rest of the context; ``logprobs``: true with
  ``top_logprobs`` 0-20.
- ``GET /v1/models``, ``GET /v1/models/{id}``; ``GET /health`` (no key needed): the model, its
  context and the engine's counters (active and waiting rows, steps, tokens); 503 with
  ``"status": "error"`` if the ``--decode process`` child has died (generation requests then
  fail with 500 ``generation_failed``).
- ``GET /``: the web page: a prompt box, the reply streaming in token by token, the sampling
  controls, and for the last token (or any token clicked) the model's top-10 next-token
  probabilities as bars. It calls ``/v1/completions`` with ``stream: true, logprobs: 10``:
  each chunk's ``logprobs.top_logprobs[0]`` maps the 10 likeliest tokens to their log-probability
  under the model (softmax of the logits at temperature 1, before top-k/top-p) at the step that
  produced that chunk's token.

Semantics: prompt + ``max_tokens`` must fit in the model's context (block_size), else 400
``context_length_exceeded`` naming the limit (no sliding window here). ``model`` is echoed, not
checked (one model per server). Without ``seed`` a random one is drawn; choice j of a prompt is
sampled with ``seed + j``, so choice 0 with seed S is what ``scratchlm sample --seed S --top-k 0``
writes for that prompt (the same sampler and generator). ``usage`` counts prompt and sampled
tokens; ``finish_reason`` is "stop" (a stop string, not included in the text) or "length".

Errors are ``{"error": {"message", "type", "param", "code"}}``: 400 for a body that is not JSON
(``invalid_json``), a field of the wrong type (``invalid_type``) or out of range
(``invalid_value``), an empty prompt (``empty_prompt``), a prompt + max_tokens beyond the context
(``context_length_exceeded``), an unsupported field (``unsupported``, e.g. a non-zero
presence_penalty); 401 ``invalid_api_key`` (with ``--api-key``, every /v1 route needs
``Authorization: Bearer KEY``, compared in constant time); 404/405 for unknown routes and
methods; 413 for a body over 1 MiB; 429 ``queue_full`` with ``Retry-After: 1`` when more than
``--max-queue`` rows would wait; 504 ``timeout`` past ``--timeout`` seconds (a stream already under
way ends with one ``data: {"error": ...}`` event instead, without ``[DONE]``). A client that
disconnects has its rows cancelled before the next decode step.

Batched decoding (``batching.py``): up to ``--max-batch`` rows (a row = one choice of one prompt)
are decoded together, each with its own KV-cache slot, position and sampling controls; rows join
and leave between steps. ``--decode`` says where the decode loop runs: ``thread`` (the default),
a thread of the server's process, where it and the HTTP side (framing, JSON, the chunks) take
turns for the interpreter lock (the BLAS calls aside), as if on one core; ``process``, a child
process (``worker.py``; POSIX), so that the two run on two cores; ``loop``, the event loop's own
thread, between its I/O. bench/serve.py compares them (``--modes``). The decode loop
has ``--blas-threads`` BLAS threads (default 1: a decode step's matrices are small). Sampling
is one pass over the rows of a kind (``sample_rows``), and a step's events reach the event loop
with one hand-off, waking only the handlers that wait. A stream writes what it has, then waits
``--stream-interval`` seconds (default 0.02) while its next tokens are decoded, and sends them
as one chunk in one write: per-token writes (a system call, the HTTP framing, a JSON object)
cost more than a decode step's share of a token once 16 requests are batched. The first token
is sent at once, and so is the end of a choice (its last text and ``finish_reason`` end the
wait: a client's next request, and the slot it takes, do not wait out the interval); with
``logprobs`` every token keeps its own chunk.
"""
from __future__ import annotations

import argparse

from scratchlm.errors import UserError

DEFAULT_PORT = 8000
DEFAULT_STREAM_INTERVAL = 0.02    # 50 writes/s per stream: smooth to the eye, cheap for the server
DECODE_MODES = ["process", "thread", "loop"]
DEFAULT_DECODE = "thread"          # "process" (POSIX only: the child inherits its pipe by descriptor) was 4-15% faster
                                  # at 16-64 clients on a busy 2-core machine, not faster at 1 (bench/serve.py --modes)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``scratchlm serve``."""
    parser.add_argument("--run", required=True, metavar="DIR", help="a run folder written by scratchlm train")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 = any free port")
    parser.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument("--max-batch", type=int, default=32, metavar="B",
                        help="rows decoded together (default 32)")
    parser.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="rows that may wait for a decoding slot; more get 429 (default 64)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S",
                        help="seconds a request may take, queueing included; then 504 (default 60)")
    parser.add_argument("--blas-threads", type=int, default=1, metavar="N",
                        help="BLAS threads for the decode steps (default 1: their matrices are small, and on a "
                             "busy machine threads waiting for each other made a 16-row step 15x slower)")
    parser.add_argument("--stream-interval", type=float, default=DEFAULT_STREAM_INTERVAL, metavar="S",
                        help="after each write a stream waits S seconds, so the tokens decoded meanwhile go out in "
                             f"one chunk and one write (default {DEFAULT_STREAM_INTERVAL}; 0 = a write per token)")
    parser.add_argument("--decode", choices=DECODE_MODES, default=DEFAULT_DECODE,
                        help="where the decode loop runs: a process of its own, beside the HTTP side (process), a "
                             "thread that takes turns with it for the interpreter lock (thread), or the event loop "
                             f"(loop); default {DEFAULT_DECODE}")
    parser.add_argument("--model-name", metavar="NAME", help="the model id in replies (default: the run folder's name)")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy", help="default numpy")


def build_server(run_dir, api_key=None, max_batch: int = 32, max_queue: int = 64, timeout: float = 60.0,
                 model_name: str | None = None, decode: str = "thread", stream_interval: float = DEFAULT_STREAM_INTERVAL,
                 blas_threads: int = 1):
    """The ``Server`` for a run folder (its ``app`` is the ASGI app); the engine starts with the app,
    where ``decode`` says: "thread" (its own thread), "loop" (a task of the event loop) or
    "process" (a child process, ``worker.ProcessEngine``, with ``blas_threads`` BLAS threads)."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    process = decode == "process"
    from pathlib import Path
    from scratchlm import backend
    from scratchlm.runs import load_model
    from scratchlm.serve.app import Server
    from scratchlm.serve.batching import BatchedDecoder
    from scratchlm.serve.worker import ProcessEngine
    model, tokenizer, _ = load_model(run_dir)
    try:
        engine = BatchedDecoder(model, tokenizer, max_batch=1 if process else max_batch, max_queue=max_queue)
    except TypeError as exc:
        raise UserError(f"{run_dir}: scratchlm serve cannot serve this run: {exc}") from None
    if process:                        # the engine above only checked that the run can be served
        engine = ProcessEngine(run_dir, max_batch, max_queue, backend.get_backend(), blas_threads)
    name = model_name or Path(run_dir).resolve().name
    return Server(model, tokenizer, name, engine, api_key=api_key, timeout=timeout, threaded=decode != "loop",
                  stream_interval=stream_interval)


def limit_blas_threads(n: int) -> bool:
    """Cap the BLAS thread pool at ``n`` (threadpoolctl, when installed); False if it could not."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(limits=n, user_api="blas")
    return True


def _check_args(args) -> None:
    if args.blas_threads < 1:
        raise UserError(f"--blas-threads must be >= 1, got {args.blas_threads}")
    if args.max_batch < 1 or args.max_queue < 0:
        raise UserError("--max-batch must be >= 1 and --max-queue >= 0")
    if not 0 <= args.stream_interval <= 1:
        raise UserError(f"--stream-interval must be in [0, 1] seconds, got {args.stream_interval}")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key must not be empty")


def cmd_serve(args) -> int:
    """Serve the run until Ctrl-C."""
    _check_args(args)
    try:
        import uvicorn
        import starlette  # noqa: F401
    except ImportError:
        raise UserError("scratchlm serve needs starlette and uvicorn: pip install 'scratchlm[serve]'") from None
    from scratchlm import backend
    try:
        backend.use_backend(args.backend)
    except backend.BackendUnavailable as exc:
        raise UserError(str(exc)) from None
    limit_blas_threads(args.blas_threads)
    server = build_server(args.run, args.api_key, args.max_batch, args.max_queue, args.timeout, args.model_name,
                          decode=args.decode, stream_interval=args.stream_interval, blas_threads=args.blas_threads)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"scratchlm serve: {server.model_name} ({server.block_size}-token context) on "
          f"http://{shown}:{args.port}/ (API at /v1; Ctrl-C stops)", flush=True)
    uvicorn.run(server.app, host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv=None) -> int:
    """``python -m scratchlm.serve --run DIR``: the command without the scratchlm CLI around it."""
    import sys
    parser = argparse.ArgumentParser(prog="scratchlm serve", description="Serve a run over HTTP (OpenAI API + page).")
    add_serve_arguments(parser)
    try:
        return cmd_serve(parser.parse_args(argv))
    except UserError as exc:
        print(f"scratchlm: error: {exc}", file=sys.stderr)
        return 2


__all__ = ["add_serve_arguments", "cmd_serve", "build_server"]
