"""scratchlm serve: the batched decoder, the OpenAI-compatible API (driven by the official client),
robustness (bad requests, disconnects, a full queue, timeouts, the API key) and the web page in a
headless browser.

Oracles: ``scratchlm.generate.stream_text`` (the one sampler: greedy and seeded sampling over HTTP
give its text token for token), the model's full forward (logits of the batched decode step), the
OpenAI wire format as the ``openai`` client parses it, HTTP status codes and the engine's counters
(a freed slot, a cancelled row). Every server binds an ephemeral port on 127.0.0.1 in a thread
and is stopped by its fixture; the run is a tiny GPT trained for a few iterations.
"""
import json
import random
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from scratchlm import backend  # noqa: E402
from scratchlm.chat import REPLY_STOPS  # noqa: E402
from scratchlm.config import TrainConfig  # noqa: E402
from scratchlm.generate import stream_text  # noqa: E402
from scratchlm.runs import load_model  # noqa: E402
from scratchlm.serve import add_serve_arguments, build_server  # noqa: E402
from scratchlm.serve.batching import BatchedDecoder, Row, wait_idle  # noqa: E402
from scratchlm.serve.protocol import chat_prompt  # noqa: E402
from scratchlm.tensor import no_grad  # noqa: E402
from scratchlm.train import train  # noqa: E402

BLOCK = 32
PROMPTS = ["the cat", "a dog ran", "birds", "the park while", "old trees and the", "on"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny GPT (2 layers, 32 channels, 32-token context) trained for 30 iterations on word soup."""
    root = tmp_path_factory.mktemp("serve")
    words = "the cat sat on a mat and the dog ran to the park while birds sang in old trees".split()
    rng = random.Random(0)
    corpus = root / "soup.txt"
    corpus.write_text(" ".join(rng.choice(words) for _ in range(1500)) + "\n", encoding="utf-8")
    config = TrainConfig.from_dict(dict(batch_size=8, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                                        learning_rate=1e-2, max_iters=30, lr_decay_iters=30, min_lr=1e-3,
                                        warmup_iters=5, eval_interval=30, eval_iters=2, log_interval=30, seed=3))
    train(config, root / "run", corpus=str(corpus), progress=False, cache_dir=root / "cache", log=lambda *a, **k: None)
    return root / "run"


@pytest.fixture(scope="module")
def model_and_tokenizer(run_dir):
    model, tokenizer, _ = load_model(run_dir)
    return model, tokenizer


def reference(model, tokenizer, prompt, n, **controls):
    """What ``scratchlm sample`` writes: stream_text with the same controls (top_k off, as the API)."""
    controls = {"temperature": 0, "top_k": None, "top_p": None, "seed": 0, **controls}
    return "".join(stream_text(model, tokenizer, prompt, max_new_tokens=n, **controls))


class LiveServer:
    """uvicorn in a thread on an ephemeral 127.0.0.1 port; ``stop()`` ends it."""

    def __init__(self, server, step_delay: float = 0.0):
        self.server, self.engine = server, server.engine
        if step_delay:                         # slow decode steps: room to disconnect or time out mid-stream
            original = self.engine._step

            def slow_step():
                time.sleep(step_delay)
                original()
            self.engine._step = slow_step
        config = uvicorn.Config(server.app, host="127.0.0.1", port=0, log_level="error", lifespan="on")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < end and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        self.port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def serve(run_dir):
    """Factory: serve(step_delay=..., **build_server options) -> a LiveServer, stopped after the test."""
    servers = []

    def start(step_delay=0.0, **options):
        live = LiveServer(build_server(run_dir, **options), step_delay)
        servers.append(live)
        return live

    yield start
    for live in servers:
        live.stop()


@pytest.fixture(scope="module")
def live(run_dir):
    live = LiveServer(build_server(run_dir, model_name="tiny"))
    yield live
    live.stop()


def openai_client(url, key="unused"):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def health(live) -> dict:
    return httpx.get(live.url + "/health").json()["engine"]


# ====================================================================== the batched decoder

def test_batched_decode_step_equals_the_full_forward(model_and_tokenizer):
    """Rows at different positions in one step give the logits of a full forward over each row's
    sequence (the oracle: GPT.forward without a cache)."""
    model, tokenizer = model_and_tokenizer
    sequences = [tokenizer.encode(p) for p in PROMPTS[:4]]
    engine = BatchedDecoder(model, tokenizer, max_batch=4)
    from scratchlm.generate import KVCache, prefill
    for slot, ids in enumerate(sequences):                 # all but the last token in the slot
        cache = KVCache(model.config, 1, model.transformer.wte.weight.dtype)
        prefill(model, np.asarray([ids[:-1]]), cache) if len(ids) > 1 else cache.reset()
        engine.decoder.cache.copy_row(cache, 0, slot, cache.length)
    tokens = np.array([ids[-1] for ids in sequences])
    positions = np.array([len(ids) - 1 for ids in sequences])
    got = engine.decoder.step(tokens, positions)                                   # (B, V)
    with no_grad():
        for row, ids in enumerate(sequences):
            logits, _ = model(np.asarray([ids]))
            expected = backend.to_numpy(logits.data)[0, -1]
            np.testing.assert_allclose(got[row], expected, rtol=1e-4, atol=1e-4)


def test_rows_of_different_lengths_join_and_leave_and_match_stream_text(model_and_tokenizer):
    """7 rows through 3 slots: rows leave at different steps (lengths, a stop string) and waiting
    rows take their slots; every row's text is stream_text's for its prompt, controls and seed."""
    model, tokenizer = model_and_tokenizer
    specs = [("the cat", 20, 0.0, None, 0, []), ("a dog ran", 3, 0.9, None, 1, []), ("birds", 11, 1.0, 0.8, 2, []),
             ("on", 1, 0.0, None, 3, []), ("the park while", 15, 0.7, None, 4, ["a"]),
             ("old trees and the", 9, 0.0, None, 5, []), ("the", 25, 1.2, 0.95, 6, [" t"])]
    events = {i: [] for i in range(len(specs))}
    rows = [Row(tokenizer.encode(p), n, temperature, None, top_p, 1.0, seed, stops, None, i, events[i].append)
            for i, (p, n, temperature, top_p, seed, stops) in enumerate(specs)]
    engine = BatchedDecoder(model, tokenizer, max_batch=3)
    engine.run_until_idle(rows)
    for i, (p, n, temperature, top_p, seed, stops) in enumerate(specs):
        text = "".join(e.text for e in events[i])
        expected = reference(model, tokenizer, p, n, temperature=temperature, top_p=top_p, seed=seed, stop=stops or None)
        assert text == expected, (i, text, expected)
        done = events[i][-1]
        assert done.kind == "done" and sum(e.kind == "done" for e in events[i]) == 1
        unstopped = reference(model, tokenizer, p, n, temperature=temperature, top_p=top_p, seed=seed)
        assert done.finish_reason == ("stop" if any(s in unstopped for s in stops) else "length")
    stats = engine.stats()
    assert stats["max_active"] == 3 and stats["rows_done"] == len(specs) and stats["active"] == stats["waiting"] == 0
    assert stats["prefills"] == len(specs)


def test_byte_level_bpe_rows_release_whole_characters_as_stream_text():
    """A byte-level BPE model (random weights: it samples stray bytes too) through the engine:
    multi-byte characters are held until complete, exactly as stream_text does, and a token that
    is not whole UTF-8 is reported as "bytes:\\x..": the logprob view of it."""
    from scratchlm.models import GPT, GPTConfig
    from scratchlm.serve.protocol import token_text
    from scratchlm.tokenizers.bpe import ByteLevelBPE
    tokenizer = ByteLevelBPE.train("caf\u00e9 na\u00efve \u00fcber \u65e5\u672c " * 20, vocab_size=280)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=24, n_layer=1, n_head=2, n_embd=16),
                seed=1).eval()
    events = {i: [] for i in range(4)}
    prompts = ["caf\u00e9", "\u65e5", "na", "\u00fcber"]
    rows = [Row(tokenizer.encode(p), 12, 1.0, None, None, 1.0, 20 + i, [], 3, i, events[i].append)
            for i, p in enumerate(prompts)]
    BatchedDecoder(model, tokenizer, max_batch=2).run_until_idle(rows)
    for i, p in enumerate(prompts):
        assert "".join(e.text for e in events[i]) == reference(model, tokenizer, p, 12, temperature=1.0, seed=20 + i)
    partial = 0xC3                                                    # a lone lead byte: not UTF-8 by itself
    assert token_text(tokenizer, partial) == (f"bytes:\\x{partial:02x}", [partial])
    whole = tokenizer.encode("caf")[0]                               # ASCII: whole characters
    assert token_text(tokenizer, whole) == (tokenizer.decode([whole]), list(tokenizer.decode_bytes([whole])))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rows_with_mixed_controls_sample_as_each_row_alone(dtype):
    """sample_rows over rows of every kind at once (greedy by temperature 0 and by top_k 1,
    different temperatures in one pass, top-k, top-p, a repetition penalty) gives each row the
    token it gets alone from sample_next_token with its own generator, step after step (the
    generators advance as they would alone). The oracle is the one-row sampler."""
    from types import SimpleNamespace
    from scratchlm.generate import apply_repetition_penalty, sample_next_token, sample_rows
    controls = [(0.0, None, None, 1.0), (0.7, None, None, 1.0), (1.0, None, None, 1.0), (1.9, 0, None, 1.0),
                (1.3, 1, None, 1.0), (0.8, 3, None, 1.0), (1.1, 3, None, 1.0), (0.9, None, 0.6, 1.0),
                (1.0, 4, 0.8, 1.0), (0.8, None, None, 1.4), (0, None, None, 1.2), (1, None, 1.0, 1.0)]
    data = np.random.default_rng(0)
    context = data.integers(0, 12, size=6)
    rows = [SimpleNamespace(temperature=t, top_k=k, top_p=p, repetition_penalty=r, context=context,
                            rng=np.random.default_rng(100 + b)) for b, (t, k, p, r) in enumerate(controls)]
    alone = [np.random.default_rng(100 + b) for b in range(len(rows))]
    for _ in range(5):
        logits = (data.standard_normal((len(rows), 12)) * 3).astype(dtype)             # (B, V)
        got = sample_rows(rows, logits)
        for b, (t, k, p, r) in enumerate(controls):
            one = apply_repetition_penalty(logits[b:b + 1], context[None], r)
            assert got[b] == int(sample_next_token(one, t, k, p, alone[b])[0]), b


def test_a_cancelled_row_leaves_and_the_others_are_unchanged(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    events = {0: [], 1: []}

    def cancel_after_three(event):
        events[0].append(event)
        if len(events[0]) == 3:
            engine.cancel([rows[0]])

    rows = [Row(tokenizer.encode("the cat"), 20, 0.0, sink=cancel_after_three, index=0),
            Row(tokenizer.encode("birds"), 20, 0.0, sink=events[1].append, index=1)]
    engine = BatchedDecoder(model, tokenizer, max_batch=2)
    engine.run_until_idle(rows)
    assert len(events[0]) == 3 and events[0][-1].kind == "token"          # no token after the cancel
    assert "".join(e.text for e in events[1]) == reference(model, tokenizer, "birds", 20)
    assert engine.stats()["rows_cancelled"] == 1 and engine.stats()["active"] == 0


# ====================================================================== the API, through the openai client

def test_openai_client_completions_greedy_equals_generate(live, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    expected = {p: reference(model, tokenizer, p, 12) for p in PROMPTS[:3]}
    client = openai_client(live.url)
    for prompt, text in expected.items():
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert reply.choices[0].text == text
        assert reply.choices[0].finish_reason == "length"
        assert reply.object == "text_completion" and reply.model == "tiny"
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(tokenizer.encode(prompt)), 12)
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text
        assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_and_n_choices_equal_stream_text(live, model_and_tokenizer):
    """Choice j of a prompt is sampled with seed + j, as stream_text with that seed."""
    model, tokenizer = model_and_tokenizer
    expected = [reference(model, tokenizer, "the cat", 15, temperature=0.9, top_p=0.9, seed=5 + j) for j in range(3)]
    client = openai_client(live.url)
    reply = client.completions.create(model="tiny", prompt="the cat", max_tokens=15, temperature=0.9, top_p=0.9,
                                      seed=5, n=3)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == expected
    assert reply.usage.completion_tokens == 45
    texts = ["", "", ""]
    for chunk in client.completions.create(model="tiny", prompt="the cat", max_tokens=15, temperature=0.9,
                                           top_p=0.9, seed=5, n=3, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == expected


def test_stop_string_ends_the_text_before_it(live, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    full = reference(model, tokenizer, "the dog", 24)
    stop = full[5:7]
    client = openai_client(live.url)
    reply = client.completions.create(model="tiny", prompt="the dog", max_tokens=24, temperature=0, stop=[stop])
    assert reply.choices[0].text == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_openai_client_chat_uses_the_documented_template(live, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    messages = [{"role": "system", "content": "park"}, {"role": "user", "content": "the cat"},
                {"role": "assistant", "content": "sat"}, {"role": "user", "content": "a dog"}]
    prompt = chat_prompt(messages)
    assert prompt == "park\n\nthe cat\nsat\n\na dog\n"
    expected = reference(model, tokenizer, prompt, 6, stop=REPLY_STOPS)
    client = openai_client(live.url)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    assert reply.object == "chat.completion"
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_logprobs_are_the_models_distribution(live, model_and_tokenizer):
    """The reported top-10 are the 10 largest of log_softmax(logits) at each step (the oracle: a
    full forward over prompt + generated text), the sampled token among them."""
    model, tokenizer = model_and_tokenizer
    client = openai_client(live.url)
    reply = client.completions.create(model="tiny", prompt="the cat", max_tokens=4, temperature=0, logprobs=10)
    logprobs = reply.choices[0].logprobs
    assert logprobs.text_offset == [0, 1, 2, 3]                           # one character per token
    ids = tokenizer.encode("the cat")
    for step, token in enumerate(logprobs.tokens):
        with no_grad():
            logits, _ = model(np.asarray([ids]))
        row = backend.to_numpy(logits.data)[0, -1].astype(np.float64)
        logp = row - row.max() - np.log(np.exp(row - row.max()).sum())
        best = np.argsort(-logp)[:10]
        assert set(logprobs.top_logprobs[step]) == {tokenizer.decode([t]) for t in best}
        for t in best:
            assert logprobs.top_logprobs[step][tokenizer.decode([t])] == pytest.approx(logp[t], abs=1e-4)
        assert token == tokenizer.decode([int(best[0])])                  # greedy: the likeliest
        ids.append(tokenizer.encode(token)[0])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=5)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 5 and c.token == c.top_logprobs[0].token for c in content)


def test_models_and_health(live):
    client = openai_client(live.url)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    body = httpx.get(live.url + "/health").json()
    assert body["status"] == "ok" and body["block_size"] == BLOCK and body["model"] == "tiny"


@pytest.mark.parametrize("decode", ["thread", "loop", "process"])
def test_concurrent_greedy_requests_equal_sequential_ones(serve, model_and_tokenizer, decode):
    model, tokenizer = model_and_tokenizer
    live = serve(model_name="tiny", decode=decode)
    lengths = [20, 5, 12, 17, 3, 9]
    expected = [reference(model, tokenizer, p, n) for p, n in zip(PROMPTS, lengths)]
    client = openai_client(live.url)
    sequential = [client.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0).choices[0].text
                  for p, n in zip(PROMPTS, lengths)]
    results = [None] * len(PROMPTS)

    def ask(i):
        chunks = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0,
                                           stream=True)
        results[i] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sequential == expected
    assert results == expected


def test_decode_process_seeded_sampling_and_stats(serve, model_and_tokenizer):
    """--decode process: seeded sampling with n choices over HTTP is stream_text's (rows cross the
    pipe with their controls and seeds), and /health shows the child's counters."""
    model, tokenizer = model_and_tokenizer
    live = serve(decode="process", model_name="tiny")
    reply = httpx.post(live.url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 12, "temperature": 0.9,
                                                            "top_p": 0.9, "seed": 7, "n": 3}, timeout=60).json()
    for j, choice in enumerate(reply["choices"]):
        assert choice["text"] == reference(model, tokenizer, "the cat", 12, temperature=0.9, top_p=0.9, seed=7 + j)
    assert wait_idle(live.engine)
    stats = health(live)
    assert stats["rows_done"] == 3 and stats["prefills"] == 3 and stats["tokens"] == reply["usage"]["completion_tokens"]
    # log-probabilities and stop strings cross the pipe too: the same stream as a decode thread's
    threaded = serve(model_name="tiny")
    body = {"prompt": "the dog", "max_tokens": 10, "temperature": 1.0, "seed": 3, "logprobs": 2, "stop": [" a"],
            "stream": True}
    streams = [[json.loads(line[6:])["choices"] for line in httpx.post(server.url + "/v1/completions", json=body,
                                                                        timeout=60).text.splitlines()
                if line.startswith("data: {")] for server in (live, threaded)]
    assert streams[0] == streams[1] and any(c[0]["logprobs"] for c in streams[0])


def test_decode_process_that_dies_fails_requests_with_a_json_error(serve):
    live = serve(decode="process", model_name="tiny")
    live.engine.process.kill()
    live.engine.reader.join(10)                                   # the pipe's end: open rows fail, and later ones
    reply = httpx.post(live.url + "/v1/completions", json={"prompt": "the", "max_tokens": 4}, timeout=30)
    assert reply.status_code == 500 and "decode process has stopped" in reply.json()["error"]["message"]
    status = httpx.get(live.url + "/health")                     # the server still answers, and says why it fails
    assert status.status_code == 503 and status.json()["status"] == "error"
    assert httpx.get(live.url + "/v1/models").status_code == 200


def test_decode_process_queue_bound_is_the_engines():
    """ProcessEngine refuses rows on this side of the pipe exactly when BatchedDecoder would:
    more than max_batch decoding + max_queue waiting; a cancelled row frees its place."""
    from scratchlm.serve.batching import QueueFull
    from scratchlm.serve.worker import ProcessEngine
    sent = []
    engine = ProcessEngine("unused", max_batch=2, max_queue=1)
    engine.conn = type("Pipe", (), {"send": staticmethod(sent.append)})()
    rows = [Row([1], 4, sink=lambda e: None) for _ in range(4)]
    engine.submit(rows[:2])
    engine.submit(rows[2:3])
    with pytest.raises(QueueFull):
        engine.submit(rows[3:4])
    engine.cancel(rows[:1])
    engine.submit(rows[3:4])
    assert [kind for kind, _ in sent] == ["submit", "submit", "cancel", "submit"]
    assert sent[2][1] == [rows[0].id] and [row_id for row_id, _ in sent[3][1]] == [rows[3].id]


# ====================================================================== robustness

def test_bad_requests_get_json_errors_and_the_server_keeps_serving(live):
    url = live.url + "/v1/completions"

    def post(body, path=url, **kw):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(path, content=data, headers={"Content-Type": "application/json"}, **kw)

    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_type"),
        ({"prompt": "the", "temperature": "hot"}, 400, "invalid_type"),
        ({"prompt": "the", "max_tokens": 2.5}, 400, "invalid_type"),
        ({"prompt": "the", "stream": "yes"}, 400, "invalid_type"),
        ({"prompt": "the", "n": 0}, 400, "invalid_value"),
        ({"prompt": "the", "temperature": -1}, 400, "invalid_value"),
        ({"prompt": 5}, 400, "invalid_type"),
        ({}, 400, "missing_required_parameter"),
        ({"prompt": ""}, 400, "empty_prompt"),
        ({"prompt": [[]]}, 400, "empty_prompt"),
        ({"prompt": [[1, 99999]]}, 400, "invalid_value"),
        ({"prompt": "the", "max_tokens": BLOCK}, 400, "context_length_exceeded"),
        ({"prompt": "the", "presence_penalty": 1.0}, 400, "unsupported"),
        ({"prompt": "the\u00e9"}, 400, "invalid_prompt"),            # not in the character vocabulary
    ]
    for body, status, code in cases:
        response = post(body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["code"] == code and error["message"] and error["type"], (body, error)
    too_long = post({"prompt": "the", "max_tokens": BLOCK}).json()["error"]["message"]
    assert f"context is {BLOCK} tokens" in too_long and f"at most {BLOCK - 3}" in too_long
    chat = live.url + "/v1/chat/completions"
    assert post({"messages": []}, chat).json()["error"]["code"] == "empty_prompt"
    assert post({"messages": "hi"}, chat).json()["error"]["code"] == "invalid_type"
    assert post({"messages": [{"role": "robot", "content": "x"}]}, chat).status_code == 400
    assert post({"messages": [{"role": "user", "content": 3}]}, chat).json()["error"]["code"] == "invalid_type"
    missing = httpx.get(live.url + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(url).status_code == 405
    assert post(b"x" * (1 << 20 + 1)).status_code == 413
    ok = post({"prompt": "the", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert health(live)["errors"] == 0


def test_api_key_required_and_compared(serve):
    live = serve(api_key="sesame")
    body = {"prompt": "the", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"},
                    {"Authorization": "Basic sesame"}):
        response = httpx.post(live.url + "/v1/completions", json=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(live.url + "/v1/models").status_code == 401
    assert httpx.get(live.url + "/health").status_code == 200             # open: for load balancers
    ok = httpx.post(live.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sesame"})
    assert ok.status_code == 200
    assert openai_client(live.url, key="sesame").completions.create(model="x", prompt="the", max_tokens=2).choices


def stream_events(url, body) -> list[dict]:
    """The JSON events of one streaming /v1/completions request, [DONE] left out."""
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as response:
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("controls", [{"temperature": 0}, {"temperature": 0.9, "seed": 5}])
def test_http_text_equals_the_scratchlm_sample_command(live, run_dir, controls):
    """The oracle is the CLI itself: ``scratchlm sample --top-k 0`` with the same controls prints
    the prompt and the very text the server returns (greedy, and sampled with the same seed)."""
    import sys
    reply = httpx.post(live.url + "/v1/completions", timeout=30,
                       json={"prompt": "the dog", "max_tokens": 15, **controls}).json()
    command = [sys.executable, "-m", "scratchlm", "sample", "--run", str(run_dir), "--prompt", "the dog",
               "--max-new-tokens", "15", "--top-k", "0", "--no-stream",
               "--temperature", str(controls["temperature"]), "--seed", str(controls.get("seed", 0))]
    printed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    assert printed == "the dog" + reply["choices"][0]["text"] + "\n"


def test_a_stream_gathers_the_tokens_of_its_interval_into_one_chunk(serve, model_and_tokenizer):
    """With --stream-interval the tokens decoded meanwhile share a chunk: the first token goes out
    at once, and the other 19 (a tiny model decodes them well within the 1 s interval) in one text
    chunk, then the finish chunk. The text is stream_text's, as with interval 0."""
    model, tokenizer = model_and_tokenizer
    body = {"prompt": "the cat", "max_tokens": 20, "temperature": 0}
    expected = reference(model, tokenizer, "the cat", 20)
    gathered = stream_events(serve(stream_interval=1.0).url, body)
    single = stream_events(serve(stream_interval=0).url, body)
    for events in (gathered, single):
        assert "".join(e["choices"][0]["text"] for e in events) == expected
        assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert len(gathered) <= 4 < len(expected)


def test_the_end_of_a_stream_does_not_wait_out_its_interval(serve, model_and_tokenizer):
    """A row's end cuts its stream's interval short: with a 30 s interval and a 5 s deadline the
    reply still ends normally, with [DONE] and the whole text (a stream that slept out its
    interval would hit the deadline and end with a timeout error instead)."""
    model, tokenizer = model_and_tokenizer
    live = serve(stream_interval=30.0, timeout=5.0)
    body = {"prompt": "the cat", "max_tokens": 20, "temperature": 0, "stream": True}
    text = httpx.post(live.url + "/v1/completions", json=body, timeout=60).text
    assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference(model, tokenizer, "the cat", 20)


@pytest.mark.parametrize("decode", ["thread", "loop"])
def test_client_disconnect_mid_stream_frees_the_slot(serve, decode):
    live = serve(decode=decode, step_delay=0.05)
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", live.url + "/v1/completions",
                           json={"prompt": "the", "max_tokens": BLOCK - 3, "stream": True}) as response:
            lines = response.iter_lines()
            chunks = []
            for line in lines:
                if line.startswith("data: "):
                    chunks.append(line)
                if len(chunks) == 2:
                    break
            assert health(live)["active"] == 1
    assert wait_idle(live.engine)
    stats = health(live)
    assert stats["rows_cancelled"] == 1 and stats["rows_done"] == 0
    assert stats["tokens"] < BLOCK - 3                        # generation stopped early
    ok = httpx.post(live.url + "/v1/completions", json={"prompt": "the", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


@pytest.mark.parametrize("decode", ["thread", "loop"])
def test_client_leaving_a_non_streamed_request_frees_the_slot(serve, decode):
    live = serve(decode=decode, step_delay=0.05)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(live.url + "/v1/completions", json={"prompt": "the", "max_tokens": BLOCK - 3}, timeout=0.5)
    assert wait_idle(live.engine)
    stats = health(live)
    assert stats["rows_cancelled"] == 1 and stats["rows_done"] == 0 and stats["tokens"] < BLOCK - 3


@pytest.mark.parametrize("decode", ["thread", "loop"])
def test_full_queue_answers_429_with_retry_after(serve, decode):
    live = serve(decode=decode, step_delay=0.05, max_batch=1, max_queue=1)
    body = {"prompt": "the", "max_tokens": BLOCK - 3, "stream": True}
    client = httpx.Client(timeout=30)
    opened = client.stream("POST", live.url + "/v1/completions", json=body)
    first = opened.__enter__()
    lines = first.iter_lines()                                # (kept: a dropped iterator closes the stream)
    next(lines)                                               # decoding: the one slot is taken
    waiting = threading.Thread(target=lambda: httpx.post(live.url + "/v1/completions", json=body, timeout=30))
    waiting.start()
    end = time.monotonic() + 30
    while health(live)["waiting"] < 1:
        assert time.monotonic() < end
        time.sleep(0.01)
    refused = httpx.post(live.url + "/v1/completions", json=body)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "queue_full"
    opened.__exit__(None, None, None)
    client.close()
    waiting.join(60)
    assert wait_idle(live.engine)
    assert httpx.post(live.url + "/v1/completions", json={"prompt": "the", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("decode", ["thread", "loop"])
def test_timeout_answers_504_or_ends_the_stream_with_an_error(serve, decode):
    live = serve(decode=decode, step_delay=0.05, timeout=0.4)
    body = {"prompt": "the", "max_tokens": BLOCK - 3}
    response = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    with httpx.stream("POST", live.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as stream:
        assert stream.status_code == 200
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert "[DONE]" not in events and json.loads(events[-1])["error"]["code"] == "timeout"
    assert wait_idle(live.engine)
    assert health(live)["rows_cancelled"] == 2
    assert httpx.post(live.url + "/v1/completions", json={"prompt": "the", "max_tokens": 2}).status_code == 200


def test_serve_command_refuses_a_missing_run_in_one_line(tmp_path):
    import os
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "scratchlm.serve", "--run", str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("scratchlm: error: run folder")


def test_serve_listens_on_loopback_by_default():
    import argparse
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--run", "x"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)


# ====================================================================== the page

def test_page_is_served(live):
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="prompt"', 'id="temperature"', 'id="top_p"', 'id="bars"', "logprobs: 10", "/v1/completions"):
        assert element in page.text


def test_page_streams_a_reply_and_draws_bars_in_a_headless_browser(live, model_and_tokenizer):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium installed")
    model, tokenizer = model_and_tokenizer
    expected = reference(model, tokenizer, "the cat", 12)
    url = f"{live.url}/?prompt=the%20cat&temperature=0&max_tokens=12&run=1"
    # virtual time fast-forwards while the page waits on the network, so the budget is generous
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3600000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    import html.parser

    class Reader(html.parser.HTMLParser):
        VOID = {"meta", "input", "br", "img", "link", "hr"}

        def __init__(self):
            super().__init__()
            self.stack, self.reply, self.bars, self.done = [], "", 0, None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag not in self.VOID:
                self.stack.append(attrs.get("id"))
            if tag == "body":
                self.done = attrs.get("data-done")
            if "bar" in (attrs.get("class") or "").split():
                self.bars += 1

        def handle_endtag(self, tag):
            if tag not in self.VOID:
                self.stack.pop()

        def handle_data(self, data):
            if "reply" in self.stack:
                self.reply += data

    reader = Reader()
    reader.feed(dom)
    assert reader.done == "1", dom[-2000:]
    assert reader.reply == expected
    assert reader.bars == min(10, tokenizer.vocab_size)
