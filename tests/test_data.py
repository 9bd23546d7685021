"""Corpora, the downloader (against a loopback HTTP server), prepared token streams, batches."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from scratchlm import backend, data
from scratchlm.data import BatchSampler, download, load_corpus, prepare
from scratchlm.errors import UserError
from scratchlm.tokenizers import ByteLevelBPE, CharTokenizer

SHARED_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder: nothing touches ~/.cache."""
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- registry and local corpora

def test_pydoc_corpus_is_embedded_and_nonempty():
    corpus = load_corpus("pydoc")
    assert len(corpus.text) > 100_000 and "assignment" in corpus.text
    assert corpus.sha256 == hashlib.sha256(corpus.text.encode("utf-8")).hexdigest()


def test_stdlib_corpus_is_python_code_in_a_deterministic_order():
    first, second = load_corpus("stdlib"), load_corpus("stdlib")
    assert first.sha256 == second.sha256 and first.files == sorted(first.files)
    assert "def " in first.text and "import " in first.text
    assert all(f.endswith(".py") and "site-packages" not in f for f in first.files)
    # the cap: the last file added is the one that crossed it
    last_size = len((data._stdlib_folder() / first.files[-1]).read_bytes())
    assert len(first.text.encode("utf-8")) < data.STDLIB_MAX_BYTES + last_size + 1


def test_registry_lists_its_sources():
    assert set(data.REGISTRY) >= {"pydoc", "stdlib", "tinyshakespeare"}
    shakespeare = data.REGISTRY["tinyshakespeare"]
    assert shakespeare.obtain == "download" and len(shakespeare.sha256) == 64


def test_local_file_keeps_its_bytes_and_hash(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("héllo\r\nworld\n".encode("utf-8"))
    corpus = load_corpus(path)
    assert corpus.text == "héllo\r\nworld\n" and corpus.name == "notes"
    assert corpus.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_folder_takes_its_text_files_sorted_and_skips_binary_and_hidden(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee", encoding="utf-8")
    (folder / "a.md").write_text("ay\n", encoding="utf-8")
    (folder / "sub" / "c.py").write_text("see = 1\n", encoding="utf-8")
    (folder / "blob.bin").write_bytes(b"\x00\x01\x02")
    (folder / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / ".hidden").write_text("secret", encoding="utf-8")
    corpus = load_corpus(str(folder))
    assert corpus.files == ["a.md", "b.txt", "sub/c.py"]
    assert corpus.text == "ay\nbee\nsee = 1\n"
    assert corpus.skipped == ["blob.bin (binary: a NUL byte at offset 0)",
                              "latin.txt (not UTF-8: byte 0xe9 at offset 3 (unexpected end of data))"]


def test_a_file_is_judged_the_same_alone_and_in_a_folder(tmp_path):
    """One rule for both: a NUL-byte file is refused alone and skipped (with the reason) in a folder."""
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="binary: a NUL byte at offset 0"):
        load_corpus(str(nul))
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "nul.txt").write_bytes(b"\x00" * 64)
    (folder / "ok.txt").write_text("fine text\n", encoding="utf-8")
    corpus = load_corpus(str(folder))
    assert corpus.files == ["ok.txt"] and corpus.skipped == ["nul.txt (binary: a NUL byte at offset 0)"]


def test_non_utf8_file_is_refused_with_the_byte_offset(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"abc caf\xe9")
    with pytest.raises(UserError, match=r"0xe9 at offset 7"):
        load_corpus(path)


def test_bad_corpus_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="neither a registered name"):
        load_corpus(tmp_path / "nowhere.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no UTF-8 text files"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        load_corpus(tmp_path / "empty.txt")


@pytest.mark.skipif(not SHARED_SHAKESPEARE.exists(), reason="../shared/corpora/tinyshakespeare.txt absent")
def test_tinyshakespeare_goes_through_the_downloader_and_the_cache(monkeypatch, private_cache):
    source = dataclasses.replace(data.REGISTRY["tinyshakespeare"], url=SHARED_SHAKESPEARE.as_uri())
    monkeypatch.setitem(data.REGISTRY, "tinyshakespeare", source)
    corpus = load_corpus("tinyshakespeare")
    assert corpus.sha256 == source.sha256 and len(corpus.text) == 1_115_394
    assert (private_cache / "corpora" / "tinyshakespeare.txt").exists()
    # Second load: served from the cache even with the source gone.
    monkeypatch.setitem(data.REGISTRY, "tinyshakespeare",
                        dataclasses.replace(source, url="file:///nonexistent/x.txt"))
    assert load_corpus("tinyshakespeare").sha256 == source.sha256


# ---------------------------------------------------------------- downloader

class LoopbackServer:
    """A tiny HTTP server on 127.0.0.1 that serves one payload, honours Range, and can
    misbehave on purpose: ``cut_after`` bytes then hang up; ``ignore_range`` answers 200."""

    def __init__(self, payload: bytes):
        self.payload, self.cut_after, self.ignore_range = payload, None, False
        self.range_headers: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                header = self.headers.get("Range")
                server.range_headers.append(header)
                start = 0
                if header and not server.ignore_range:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    if start >= len(server.payload):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                else:
                    self.send_response(200)
                body = server.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    self.wfile.write(body[:server.cut_after])
                    self.wfile.flush()
                    self.close_connection = True      # hang up mid-body
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file.txt"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, size=300_000, dtype=np.uint8))
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture
def server():
    s = LoopbackServer(PAYLOAD)
    yield s
    s.close()


def test_download_verifies_and_renames_atomically(server, tmp_path):
    dest = tmp_path / "got.bin"
    assert download(server.url, dest, PAYLOAD_SHA) == dest
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "got.bin.part").exists()
    download(server.url, dest, PAYLOAD_SHA)            # cached: no second request
    assert server.range_headers == [None]


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path):
    dest = tmp_path / "got.bin"
    with pytest.raises(UserError, match="sha256"):
        download(server.url, dest, "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    dest = tmp_path / "got.bin"
    server.cut_after = 100_000
    with pytest.raises(UserError, match="interrupted"):
        download(server.url, dest, PAYLOAD_SHA, chunk_size=4096)
    part = tmp_path / "got.bin.part"
    assert not dest.exists() and 0 < part.stat().st_size < len(PAYLOAD)
    have = part.stat().st_size
    server.cut_after = None
    download(server.url, dest, PAYLOAD_SHA)
    assert server.range_headers[-1] == f"bytes={have}-"
    assert dest.read_bytes() == PAYLOAD and not part.exists()


def test_resume_against_a_server_that_ignores_range_starts_over(server, tmp_path):
    (tmp_path / "got.bin.part").write_bytes(b"stale bytes from another file")
    server.ignore_range = True
    download(server.url, tmp_path / "got.bin", PAYLOAD_SHA)
    assert (tmp_path / "got.bin").read_bytes() == PAYLOAD


def test_a_complete_part_file_is_finished_without_new_bytes(server, tmp_path):
    (tmp_path / "got.bin.part").write_bytes(PAYLOAD)
    download(server.url, tmp_path / "got.bin", PAYLOAD_SHA)         # server answers 416
    assert (tmp_path / "got.bin").read_bytes() == PAYLOAD


def test_download_from_a_file_url_and_unreachable_urls(tmp_path):
    source = tmp_path / "source.txt"
    source.write_bytes(PAYLOAD)
    assert download(source.as_uri(), tmp_path / "copy.bin", PAYLOAD_SHA).read_bytes() == PAYLOAD
    with pytest.raises(UserError, match="cannot download"):
        download((tmp_path / "missing.txt").as_uri(), tmp_path / "x.bin", PAYLOAD_SHA)
    with pytest.raises(UserError, match="cannot download"):
        download("http://127.0.0.1:9/none", tmp_path / "y.bin", PAYLOAD_SHA, timeout=2)


# ---------------------------------------------------------------- prepare

def test_prepare_writes_streams_that_decode_back_to_the_corpus(tmp_path):
    corpus = load_corpus("pydoc")
    tok = ByteLevelBPE.train(corpus.text[:50_000], vocab_size=300)
    prepared = prepare(corpus, tok, cache_dir=tmp_path, val_fraction=0.1)
    assert isinstance(prepared.train, np.memmap) and prepared.train.dtype == np.uint16
    ids = np.concatenate([prepared.train, prepared.val])
    assert tok.decode(ids.tolist()) == corpus.text
    assert len(prepared.val) == round(0.1 * len(ids))
    meta = json.loads((prepared.path / "meta.json").read_text(encoding="utf-8"))
    assert meta["source_sha256"] == corpus.sha256 and meta["dtype"] == "uint16"
    assert meta["train_tokens"] == len(prepared.train) and meta["tokenizer"] == tok.to_dict()
    assert prepared.tokenizer.to_dict() == tok.to_dict()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.text(alphabet="ab '1.\n\t", max_size=60), st.integers(1, 12))
def test_encoding_in_chunks_gives_exactly_the_ids_of_one_encode(text, chunk_chars):
    tok = _chunk_test_bpe()
    assert data.encode_in_chunks(tok, text, chunk_chars=chunk_chars).tolist() == tok.encode(text)


@functools.lru_cache(maxsize=1)
def _chunk_test_bpe():
    return ByteLevelBPE.train("ab a\nb 'a 1.1\n\n  ab\tab ba\n" * 5, vocab_size=290)


def test_prepare_reuses_the_cache_without_encoding_again(tmp_path, monkeypatch):
    corpus = load_corpus("pydoc")
    tok = CharTokenizer.from_text(corpus.text)
    first = prepare(corpus, tok, cache_dir=tmp_path)
    monkeypatch.setattr(tok, "encode", lambda text: pytest.fail("encoded twice"))
    second = prepare(corpus, tok, cache_dir=tmp_path)
    assert second.path == first.path and np.array_equal(second.train, first.train)
    # Another split or tokenizer goes to another folder.
    monkeypatch.undo()
    assert prepare(corpus, tok, cache_dir=tmp_path, val_fraction=0.2).path != first.path


def test_big_vocabularies_are_stored_as_uint32(tmp_path):
    chars = "".join(chr(c) for c in range(0x20, 0x20 + 70_000) if not 0xD800 <= c < 0xE000)
    corpus = data._make_corpus("wide", chars, "generated")
    prepared = prepare(corpus, CharTokenizer.from_text(chars), cache_dir=tmp_path)
    assert prepared.train.dtype == np.uint32 and prepared.meta["dtype"] == "uint32"
    assert int(np.concatenate([prepared.train, prepared.val]).max()) == len(set(chars)) - 1


def test_a_cache_that_does_not_match_is_refused_then_rebuilt_on_request(tmp_path):
    corpus = load_corpus("pydoc")
    tok = CharTokenizer.from_text(corpus.text)
    prepared = prepare(corpus, tok, cache_dir=tmp_path)
    meta_path = prepared.path / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta_path.write_text(json.dumps(dict(meta, source_sha256="f" * 64)), encoding="utf-8")
    with pytest.raises(UserError, match="source_sha256"):
        prepare(corpus, tok, cache_dir=tmp_path)
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    with open(prepared.path / "train.bin", "r+b") as f:      # truncate the stream
        f.truncate(10)
    with pytest.raises(UserError, match="rebuild=True"):
        prepare(corpus, tok, cache_dir=tmp_path)
    meta_path.write_text("{broken", encoding="utf-8")
    with pytest.raises(UserError, match="unreadable"):
        prepare(corpus, tok, cache_dir=tmp_path)
    rebuilt = prepare(corpus, tok, cache_dir=tmp_path, rebuild=True)
    assert np.array_equal(np.asarray(rebuilt.train), np.asarray(tok.encode(corpus.text)[:len(rebuilt.train)]))


def test_bad_val_fraction_is_a_user_error(tmp_path):
    corpus = data._make_corpus("tiny", "abcabc", "generated")
    with pytest.raises(UserError, match="val_fraction"):
        prepare(corpus, CharTokenizer.from_text("abc"), cache_dir=tmp_path, val_fraction=1.0)


# ---------------------------------------------------------------- batches

def test_batches_are_windows_of_the_stream_with_y_shifted_by_one():
    tokens = np.arange(1000, dtype=np.uint16)            # token value = its position
    sampler = BatchSampler(tokens, batch_size=6, block_size=16, seed=3)
    x, y = sampler.batch(0)
    x, y = backend.to_numpy(x), backend.to_numpy(y)
    assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == np.int64
    assert np.array_equal(y, x + 1)                       # y is x shifted by one position
    assert np.array_equal(x, x[:, :1] + np.arange(16))    # each row is a contiguous window
    assert x.min() >= 0 and y.max() <= 999


def test_batches_depend_only_on_seed_and_step():
    tokens = np.random.default_rng(0).integers(0, 50, size=5000).astype(np.uint16)
    a = BatchSampler(tokens, 4, 32, seed=7)
    b = BatchSampler(tokens, 4, 32, seed=7)
    later = [backend.to_numpy(t) for t in b.batch(5)]
    for step in range(5):
        a.batch(step)
    assert all(np.array_equal(u, backend.to_numpy(v)) for u, v in zip(later, a.batch(5)))
    assert not np.array_equal(backend.to_numpy(a.batch(5)[0]), backend.to_numpy(a.batch(6)[0]))
    assert BatchSampler(tokens, 4, 32, seed=7).state_dict()["seed"] == 7


def test_every_start_position_can_be_drawn_including_the_last():
    tokens = np.arange(10, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=64, block_size=9, seed=0)
    x, y = (backend.to_numpy(t) for t in sampler.batch(0))
    assert np.array_equal(x, np.tile(np.arange(9), (64, 1))) and y[0, -1] == 9


def test_a_stream_shorter_than_block_size_plus_one_is_refused():
    with pytest.raises(UserError, match=r"10 tokens.*block_size \+ 1 = 11"):
        BatchSampler(np.arange(10, dtype=np.uint16), batch_size=2, block_size=10, seed=0)
    with pytest.raises(UserError, match="batch_size"):
        BatchSampler(np.arange(10, dtype=np.uint16), batch_size=0, block_size=4, seed=0)
