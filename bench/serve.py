"""Serving under load: ``scratchlm serve`` driven by N concurrent streaming clients on the loopback.

    python bench/serve.py                         # N = 1, 4, 16 in about 2 minutes (trains a nano-cpu
                                                  # run first, 300 iterations, if --run is not given)
    python bench/serve.py --full                  # N = 1, 4, 16, 64
    python bench/serve.py --run runs/nano --clients 1 16 --seconds 10 --repeats 3
    python bench/serve.py --modes process thread loop   # where the server decodes (scratchlm serve --decode)

The server runs in its own process (``python -m scratchlm.serve``). For each N, N clients each
send streaming ``/v1/completions`` requests one after another (a prompt of 8-16 characters of
tiny shakespeare, ``max_tokens`` new tokens, temperature 0.8, ``stream_options.include_usage``)
until each has sent ``--requests`` or ``--seconds`` have passed. The levels are run ``--repeats``
times, interleaved (1, 4, 16, 64, 1, 4, ...), and with several ``--modes`` each level runs on
each mode's server in turn (all servers are started first), so that a change in the machine's
load touches every level and every mode; a level pools the requests of its rounds. The clients are a minimal asyncio
HTTP/1.1 client in this process (counting ``data:`` lines as they arrive, parsing only the usage
chunk), so that on a small machine they take little CPU from the server they measure. Per level:

- requests/s and tokens/s: completed requests and their completion tokens (from ``usage``) over
  the level's wall time; ``x 1 client``: tokens/s over the 1-client level's (same mode);
- TTFT: time from sending a request to its first token chunk, p50 and p95 over requests;
- per token: (time of the last chunk - first chunk) / (tokens - 1) per request, p50 and p95;
- tok/chunk: completion tokens per streamed chunk (the server's ``--stream-interval`` coalescing:
  1.0 would be a chunk, and a write, per token);
- errors: requests answered with a non-200 status or an error event (must be 0 below the queue
  limit: --max-batch + --max-queue rows);
- cpu ms/tok: the server process's CPU time (all threads) over the level per completed token,
  and ``x 1 (cpu)``: that of the 1-client level over this one's, the throughput ratio of a
  server with the CPUs to itself. On a busy machine wall-clock rates follow the other load;
  this ratio does much less.

The server streams with its default ``--stream-interval`` (20 ms: the tokens a stream's
request decoded within it go out in one chunk and one write; ``--stream-interval 0`` here
passes 0 to the server: a write per token whenever the event loop keeps up).

The peer is the same server decoding one request at a time (``--max-batch 1``, the queue holding
the rest), at the largest N up to 16: the ``unbatched`` row; batching is the difference.
A ``64 + disconnects`` level has a quarter of the requests close their connection after 3
tokens (not counted as errors); the server's resident memory is read before the first level, after
each round, after the load and after a short rest (``rss``: a leak shows as growth from round to
round), and /health must still answer.

Writes bench/results/serve.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt"

from scratchlm.serve import DECODE_MODES, DEFAULT_DECODE  # noqa: E402  (argparse and errors only: no model code)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a run folder (default: train nano-cpu for --train-iters into --train-dir)")
    parser.add_argument("--train-dir", default=str(ROOT / "runs" / "serve-bench"))
    parser.add_argument("--train-iters", type=int, default=300)
    parser.add_argument("--clients", type=int, nargs="+", default=None,
                        help="client counts (default 1 4 16; with --full 1 4 16 64)")
    parser.add_argument("--full", action="store_true", help="also 64 clients (and the disconnect level at 64)")
    parser.add_argument("--requests", type=int, default=100, help="requests per client per level (default 100)")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="time per level: clients start no request after it (default 8)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds over the levels, interleaved; a level pools its rounds' requests (default 2)")
    parser.add_argument("--stream-interval", type=float, default=None,
                        help="passed to the server (default: the server's default)")
    parser.add_argument("--modes", nargs="+", choices=DECODE_MODES, default=[DEFAULT_DECODE],
                        help="where the server decodes (its --decode): a process of its own, a thread, or the event "
                             f"loop; the first one gives the targets line (default {DEFAULT_DECODE})")
    parser.add_argument("--no-peer", action="store_true", help="skip the unbatched (--max-batch 1) row")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args(argv)
    if args.clients is None:
        args.clients = [1, 4, 16, 64] if args.full else [1, 4, 16]
    return args


# ====================================================================== the run and the server

def ensure_run(args) -> Path:
    if args.run:
        return Path(args.run)
    run = Path(args.train_dir)
    if (run / "model.safetensors").is_file():
        print(f"using the trained run in {run}")
        return run
    from scratchlm.config import load_preset
    from scratchlm.train import train
    corpus = str(CORPUS) if CORPUS.is_file() else "tinyshakespeare"
    config = load_preset("nano-cpu").with_value("max_iters", args.train_iters, where="--train-iters")
    config = config.with_value("lr_decay_iters", args.train_iters, where="--train-iters")
    config = config.with_value("eval_interval", args.train_iters, where="--train-iters").validate()
    print(f"training nano-cpu for {args.train_iters} iterations into {run} ...", flush=True)
    train(config, run, corpus=corpus, tokenizer="char", progress=False, log=lambda *a, **k: None)
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, run: Path, max_batch: int, max_queue: int, mode: str = "thread", stream_interval=None):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scratchlm.serve", "--run", str(run), "--port", str(self.port),
             "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--timeout", "120"]
            + ["--decode", mode]
            + ([] if stream_interval is None else ["--stream-interval", str(stream_interval)]),
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"
        import httpx
        end = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"the server did not start: {self.process.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)

    def pids(self) -> list[int]:
        """The server process and its descendants (the decode process of --decode process)."""
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                todo += [int(child) for child in task.read_text().split()]
        return found

    def cpu_s(self) -> float:
        """The server's CPU time so far (user + system, all its threads and processes)."""
        total = 0
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        """Resident memory of the server's processes, summed."""
        total = 0.0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        return total

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


# ====================================================================== the clients

def prompts(run: Path, count: int, seed: int = 0) -> list[str]:
    """8-16 characters of tiny shakespeare each, kept to what the run's tokenizer can encode."""
    from scratchlm.errors import UserError
    from scratchlm.tokenizers import load as load_tokenizer
    tokenizer = load_tokenizer(run / "tokenizer.json")
    text = CORPUS.read_text(encoding="utf-8") if CORPUS.is_file() else "ROMEO:\nBut soft, what light. " * 50
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        start = rng.randrange(0, len(text) - 20)
        piece = text[start:start + rng.randint(8, 16)]
        try:
            if tokenizer.encode(piece):
                out.append(piece)
        except UserError:
            pass
    return out


USAGE = re.compile(rb'"completion_tokens":(\d+)')


async def one_request(host, port, prompt, max_tokens, seed, cut_after=None) -> dict:
    """One streaming request over a plain asyncio connection: a minimal HTTP/1.1 client, so that the
    clients (in this process, on the same CPUs as the server) cost little per token. A chunk is
    counted when its ``data: `` line arrives; the usage chunk gives the token count."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    sent = time.perf_counter()
    first = last = None
    chunks, tail, data = 0, b"", b""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        return {"error": f"connect: {exc}"}
    try:
        writer.write(head + body)
        status_line = await reader.readline()
        if b" 200 " not in status_line:
            return {"error": status_line.decode(errors="replace").strip() + " " +
                    (await reader.read(300)).decode(errors="replace")}
        while True:
            block = await reader.read(65536)
            if not block:
                break
            now = time.perf_counter()
            data = tail + block
            events = data.count(b"data: ")
            if b"data: [DONE]" in data:
                events -= 1
            usage = b'"usage":{' in data
            events -= usage
            if events > 0:
                first = first or now
                last = now
                chunks += events
            if b'"error":{' in data:
                return {"error": data.decode(errors="replace")[-300:]}
            if usage:
                tokens = int(USAGE.search(data[data.index(b'"usage":{'):]).group(1))
                break
            if cut_after is not None and chunks >= cut_after:
                return {"cut": True}
            tail = data[-64:]                      # a marker may straddle two reads
            if b"data: " in tail:
                tail = tail[tail.rindex(b"data: ") + 1:]
        else:
            return {"error": "no usage"}
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        writer.close()
    if first is None:
        return {"error": "no tokens"}
    return {"ttft": first - sent, "tokens": tokens, "chunks": chunks,
            "per_token": (last - first) / (tokens - 1) if tokens > 1 else None, "end": last}


def timed_level(server, run, n_clients, requests, seconds, max_tokens, cut_fraction=0.0):
    """``level`` against a running server: (results, wall s, the server's CPU s over the level)."""
    cpu = server.cpu_s()
    results, wall = asyncio.run(level(server.url, run, n_clients, requests, seconds, max_tokens, cut_fraction))
    return results, wall, server.cpu_s() - cpu


async def level(url, run, n_clients, requests, seconds, max_tokens, cut_fraction=0.0):
    """N clients, each sending requests back to back until ``requests`` each or ``seconds`` in all."""
    host, port = url.split("//")[1].split(":")
    pool = prompts(run, 64, seed=n_clients)
    results = []
    deadline = time.perf_counter() + seconds

    async def client_loop(c):
        rng = random.Random(c)
        for r in range(requests):
            if time.perf_counter() > deadline:
                return
            cut = 3 if rng.random() < cut_fraction else None
            results.append(await one_request(host, int(port), rng.choice(pool), max_tokens, c * 1000 + r, cut))

    start = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in range(n_clients)))
    return results, time.perf_counter() - start


def summarize(n_clients: int, runs: list[tuple[list[dict], float]]) -> dict:
    """Pool the requests of a level's rounds: rates over the summed wall time, percentiles over requests."""
    results = [r for rs, _, _ in runs for r in rs]
    wall = sum(w for _, w, _ in runs)
    cpu = sum(c for _, _, c in runs)
    done = [r for r in results if "ttft" in r]
    ttft = sorted(r["ttft"] for r in done)
    per_token = sorted(r["per_token"] for r in done if r["per_token"] is not None)
    tokens = sum(r["tokens"] for r in done)
    errors = [r["error"] for r in results if "error" in r]
    return {"clients": n_clients, "requests": len(done), "cut": sum("cut" in r for r in results),
            "errors": len(errors), "error_examples": errors[:3], "wall_s": wall, "requests_per_s": len(done) / wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
            "per_token_p50_ms": 1e3 * pct(per_token, 50), "per_token_p95_ms": 1e3 * pct(per_token, 95),
            "server_cpu_s": cpu, "server_cpu_ms_per_token": 1e3 * cpu / tokens if tokens else float("nan"),
            "tokens_per_chunk": tokens / max(sum(r["chunks"] for r in done), 1)}


def cpu_ratio(one: dict | None, row: dict) -> float:
    """The server's CPU per token with one client over this level's: the throughput ratio of a
    server that had the CPU to itself (a busy machine distorts wall-clock rates, not this)."""
    if not one:
        return float("nan")
    return one["server_cpu_ms_per_token"] / row["server_cpu_ms_per_token"]


def pct(values, q) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# ====================================================================== main

def measure(run: Path, args) -> tuple[list[dict], dict]:
    """The levels against one server per mode, all started first, so that every round runs each
    level on each mode in turn (a change in the machine's load touches every mode alike); then
    each mode's disconnect level and memory."""
    servers, rows, memory = {}, [], {}
    try:
        for mode in args.modes:
            servers[mode] = ServerProcess(run, args.max_batch, args.max_queue, mode, args.stream_interval)
        runs = {(mode, n): [] for mode in args.modes for n in args.clients}
        for mode, server in servers.items():
            memory[mode] = {"rss_start": server.rss_mb(), "rss_after_round": []}
            asyncio.run(level(server.url, run, 2, 1, args.seconds, 4))        # warm-up: Numba kernels, first batch
        for _ in range(args.repeats):
            for n in args.clients:
                for mode, server in servers.items():
                    done = timed_level(server, run, n, args.requests, args.seconds, args.max_tokens)
                    runs[mode, n].append(done)
                    print(f"  {mode}, {n} clients: {sum(r.get('tokens', 0) for r in done[0]) / done[1]:.0f} tokens/s",
                          flush=True)
            for mode, server in servers.items():
                memory[mode]["rss_after_round"].append(server.rss_mb())
        import httpx
        biggest = max(args.clients)
        for mode, server in servers.items():
            label = "" if len(args.modes) == 1 else f" ({mode})"
            for n in args.clients:
                rows.append({**summarize(n, runs[mode, n]), "name": f"{n} client{'s' * (n > 1)}{label}", "mode": mode})
            cut = timed_level(server, run, biggest, args.requests, args.seconds, args.max_tokens, cut_fraction=0.25)
            rows.append({**summarize(biggest, [cut]), "name": f"{biggest} + disconnects{label}", "mode": mode})
            memory[mode]["rss_after_load"] = server.rss_mb()
        time.sleep(2)
        for mode, server in servers.items():
            memory[mode]["health_after"] = httpx.get(server.url + "/health", timeout=10).json()
            memory[mode]["rss_after_rest"] = server.rss_mb()
    finally:
        for server in servers.values():
            server.stop()
    return rows, memory


def main(argv=None) -> int:
    args = parse_args(argv)
    run = ensure_run(args)
    load = os.getloadavg()
    rows, memory = measure(run, args)
    if not args.no_peer:
        n = max([c for c in args.clients if c <= 16] or [min(args.clients)])
        peer = ServerProcess(run, 1, max(args.max_queue, n), args.modes[0], args.stream_interval)
        try:
            asyncio.run(level(peer.url, run, 2, 1, args.seconds, 4))
            rounds = [timed_level(peer, run, n, args.requests, args.seconds, args.max_tokens)
                      for _ in range(args.repeats)]
            rows.append({**summarize(n, rounds), "name": f"{n} unbatched", "mode": args.modes[0]})
        finally:
            peer.stop()

    ones = {r["mode"]: r for r in rows if r["clients"] == 1 and "unbatched" not in r["name"]
            and "disconnects" not in r["name"]}
    bases = {mode: r["tokens_per_s"] for mode, r in ones.items()}
    base = bases.get(args.modes[0])
    load_after = os.getloadavg()
    header = (f"{'level':<26}{'requests':>9}{'errors':>7}{'req/s':>8}{'tokens/s':>10}{'x 1 client':>11}"
              f"{'TTFT p50':>10}{'TTFT p95':>10}{'tok p50 ms':>11}{'tok p95 ms':>11}{'tok/chunk':>10}{'cpu ms/tok':>11}"
              f"{'x 1 (cpu)':>10}")
    print(f"\nscratchlm serve on {run} (max_batch {args.max_batch}, max_queue {args.max_queue}), "
          f"{args.max_tokens} tokens per request, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} before, {load_after[0]:.1f} after")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r["tokens_per_s"] / bases[r["mode"]] if bases.get(r["mode"]) else float("nan")
        r["x_one_client"] = ratio
        print(f"{r['name']:<26}{r['requests']:>9}{r['errors']:>7}{r['requests_per_s']:>8.2f}{r['tokens_per_s']:>10.0f}"
              f"{ratio:>11.2f}{r['ttft_p50_s']:>10.3f}{r['ttft_p95_s']:>10.3f}{r['per_token_p50_ms']:>11.1f}"
              f"{r['per_token_p95_ms']:>11.1f}{r['tokens_per_chunk']:>10.1f}{r['server_cpu_ms_per_token']:>11.3f}{cpu_ratio(ones.get(r['mode']), r):>10.2f}")
    for mode, m in memory.items():
        health = m["health_after"]
        rounds = ", ".join(f"{x:.0f}" for x in m["rss_after_round"])
        print(f"server ({mode}) rss: {m['rss_start']:.0f} MB at start, after each round {rounds} MB, "
              f"{m['rss_after_load']:.0f} MB after the load, "
              f"{m['rss_after_rest']:.0f} MB after 2 s of rest; /health after: {health['status']}, engine active "
              f"{health['engine']['active']}, waiting {health['engine']['waiting']}, cancelled rows "
              f"{health['engine']['rows_cancelled']}")
    sixteen = next((r for r in rows if r["clients"] == 16 and "unbatched" not in r["name"]
                    and "disconnects" not in r["name"]), None)   # the first mode's
    if sixteen and base:
        print(f"targets: 16 clients tokens/s = {sixteen['tokens_per_s'] / base:.2f}x one client's (>= 5x: "
              f"{'met' if sixteen['tokens_per_s'] >= 5 * base else 'missed'}; server CPU per token: "
              f"{cpu_ratio(ones[args.modes[0]], sixteen):.2f}x); p95 TTFT at 16 clients "
              f"{sixteen['ttft_p95_s']:.3f} s (< 1 s: {'met' if sixteen['ttft_p95_s'] < 1 else 'missed'})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": str(run), "args": vars(args), "load_average_before": load,
                               "load_average_after": os.getloadavg(), "levels": rows, "memory": memory}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
