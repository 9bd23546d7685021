"""Corpora -> token streams on disk -> batches.

Three steps, one function each:

    corpus = load_corpus("tinyshakespeare")          # a registered name, a file or a folder
    prepared = prepare(corpus, tokenizer)            # train.bin / val.bin memmaps + meta.json, cached
    sampler = BatchSampler(prepared.train, batch_size=12, block_size=64, seed=0)
    x, y = sampler.batch(step)                       # (B, T) int64 backend arrays, y = x shifted by 1

The registry (``REGISTRY``) names the corpora scratchlm knows how to obtain. None of their text
lives in the repository: ``pydoc`` and ``stdlib`` come with every CPython, ``tinyshakespeare``
is downloaded once (sha256-checked, resumable, atomic) into the user cache directory:
``$SCRATCHLM_CACHE``, else ``$XDG_CACHE_HOME/scratchlm``, else ``~/.cache/scratchlm``.

Text files must be UTF-8 and hold no NUL bytes (a NUL marks a binary file). One rule,
``text_file_problem``, judges a file alone or in a folder: given alone, a file that breaks it is
refused with the reason (the byte offset of the first bad byte); inside a folder it is skipped,
and ``Corpus.skipped`` lists each skipped file with its reason (``scratchlm train`` prints them
as a note).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import sysconfig
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scratchlm import backend
from scratchlm.errors import UserError

# ---------------------------------------------------------------- cache location


def cache_root() -> Path:
    """Where downloads and prepared token streams go (created on first use)."""
    if os.environ.get("SCRATCHLM_CACHE"):
        return Path(os.environ["SCRATCHLM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "scratchlm"


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class CorpusSource:
    """A named corpus: what it is and how to obtain it."""
    name: str
    description: str
    obtain: str                   # "builtin" (ships with Python), "package" (scratchlm.datasets) or "download"
    url: str | None = None
    sha256: str | None = None
    filename: str | None = None   # name in the cache folder, for downloads
    license: str = ""
    split: str | None = None      # a fixed split of its documents (one per line): "makemore"


STDLIB_MAX_BYTES = 4_000_000      # keep the code corpus practical: ~4 MB of source
COCO_DEV_SIZE, COCO_DEV_SEED = 500, 13    # coco's dev slice: that many training sentences, this seed

REGISTRY: dict[str, CorpusSource] = {s.name: s for s in [
    CorpusSource(
        name="pydoc",
        description="English prose: the Python language reference topics that ship with every "
                    "CPython as pydoc_data.topics (~465 KB); the embedded default, no download",
        obtain="builtin", license="PSF License (part of CPython)"),
    CorpusSource(
        name="stdlib",
        description="Python code: the running interpreter's standard-library .py files in sorted "
                    f"path order (tests and site-packages left out), capped at {STDLIB_MAX_BYTES:,} bytes",
        obtain="builtin", license="PSF License (part of CPython)"),
    CorpusSource(
        name="tinyshakespeare",
        description="40,000 lines of Shakespeare's plays (1,115,394 bytes), the char-rnn / nanoGPT toy corpus",
        obtain="download",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt", license="public domain text"),
    CorpusSource(
        name="names",
        description="32,032 first names, one per line (makemore's names.txt), with makemore's lecture split "
                    "80/10/10 train/dev/test; trained one name per document, framed by a boundary token",
        obtain="package", filename="names.txt", license="MIT (makemore); see scratchlm/datasets/README.md",
        split="makemore"),
    CorpusSource(
        name="coco",
        description="MS-COCO image captions as in the Texygen benchmark: 10,000 training and 10,000 test "
                    "sentences, lowercase, one per line; train with a word tokenizer (--tokenizer word). "
                    f"A {COCO_DEV_SIZE}-sentence dev slice is carved from train by a fixed seed; test is the "
                    "Texygen test file, never trained on",
        obtain="package", filename="coco_captions_train.txt",
        license="MIT (Texygen) / CC BY 4.0 (COCO captions); see scratchlm/datasets/README.md", split="texygen"),
]}


@dataclass
class Corpus:
    name: str
    text: str
    sha256: str                        # of the UTF-8 bytes of ``text`` (= the file's bytes for one file)
    source: str                        # where it came from: a path, a URL, a module
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    split: str | None = None           # a registered corpus's fixed document split (see split_documents)

    def __repr__(self) -> str:
        return f"Corpus(name={self.name!r}, chars={len(self.text):,}, sha256={self.sha256[:12]}..)"


def _make_corpus(name, text, source, files=(), skipped=()) -> Corpus:
    if not text:
        raise UserError(f"corpus {name!r} ({source}) is empty; give it some text")
    sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return Corpus(name, text, sha, str(source), list(files), list(skipped))


def text_file_problem(data: bytes) -> str | None:
    """Why these bytes are not a text corpus file (None: they are). The one rule for files given
    alone and files inside a folder."""
    nul = data.find(b"\0")
    if nul >= 0:
        return f"binary: a NUL byte at offset {nul}"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} ({exc.reason})"
    return None


def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read corpus file {path}: {exc.strerror}") from None
    problem = text_file_problem(data)
    if problem is not None:
        fix = "convert it first, e.g. iconv -f latin1 -t utf-8" if problem.startswith("not UTF-8") \
            else "give a text file"
        raise UserError(f"corpus file {path} is {problem}; {fix}")
    return data.decode("utf-8")


def _text_files_under(folder: Path):
    """(sorted (relative path, text) of the text files, sorted "relative path (reason)" of those
    skipped). Hidden entries are ignored."""
    keep, skipped = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            try:
                data = path.read_bytes()
            except OSError as exc:
                skipped.append(f"{relative} (unreadable: {exc.strerror})")
                continue
            problem = text_file_problem(data)
            if problem is None:
                keep.append((relative, data.decode("utf-8")))
            else:
                skipped.append(f"{relative} ({problem})")
    keep.sort()
    return keep, sorted(skipped)


def _load_folder(folder: Path) -> Corpus:
    files, skipped = _text_files_under(folder)
    if not files:
        raise UserError(f"folder {folder} has no UTF-8 text files (checked {len(skipped)} other files); "
                        f"point at a text file or a folder of them")
    # Files are joined in sorted path order, each ending in one newline, so the corpus is the
    # same on every machine that has the same files.
    text = "".join(t if t.endswith("\n") else t + "\n" for _, t in files)
    return _make_corpus(folder.name, text, folder, [p for p, _ in files], skipped)


def _load_pydoc() -> Corpus:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("this Python has no pydoc_data module (some distributions split it out); "
                        "use --corpus stdlib or a text file") from None
    text = "\n\n".join(topics[key].strip("\n") for key in sorted(topics)) + "\n"
    return _make_corpus("pydoc", text, "pydoc_data.topics", sorted(topics))


def _stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _load_stdlib(max_bytes: int = STDLIB_MAX_BYTES) -> Corpus:
    folder = _stdlib_folder()
    left_out = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in left_out and not d.startswith("."))
        paths += [Path(root) / f for f in files if f.endswith(".py")]
    paths.sort(key=lambda p: p.relative_to(folder).as_posix())
    parts, used, total = [], [], 0
    for path in paths:
        if total >= max_bytes:
            break
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        text = text if text.endswith("\n") else text + "\n"
        parts.append(text)
        used.append(path.relative_to(folder).as_posix())
        total += len(text.encode("utf-8"))
    if not parts:
        raise UserError(f"found no standard-library .py files under {folder}; use another corpus")
    return _make_corpus("stdlib", "".join(parts), folder, used)


def _load_download(source: CorpusSource) -> Corpus:
    path = download(source.url, cache_root() / "corpora" / source.filename, source.sha256, progress=True)
    text = _read_text_file(path)
    return _make_corpus(source.name, text, source.url)


def load_corpus(name_or_path) -> Corpus:
    """A registered corpus by name (``REGISTRY``), or a local text file, or a folder of them."""
    key = str(name_or_path)
    if key in REGISTRY and not isinstance(name_or_path, Path):
        source = REGISTRY[key]
        if key == "pydoc":
            return _load_pydoc()
        if key == "stdlib":
            return _load_stdlib()
        if source.obtain == "package":
            from scratchlm.datasets import dataset_path
            path = dataset_path(source.filename)
            corpus = _make_corpus(source.name, _read_text_file(path), path)
            corpus.split = source.split
            return corpus
        return _load_download(source)
    path = Path(key).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        return _make_corpus(path.stem, _read_text_file(path), path)
    raise UserError(f"corpus {key!r} is neither a registered name ({', '.join(REGISTRY)}) "
                    f"nor an existing file or folder")


def makemore_split(words: list[str]) -> dict[str, list[str]]:
    """makemore's lecture split: ``random.seed(42); random.shuffle(words)``, then the first 80%
    train, the next 10% dev (our "val"), the last 10% test. ``random.Random(42)`` draws the same
    numbers as the seeded global generator, without touching it."""
    words = list(words)
    random.Random(42).shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return {"train": words[:n1], "val": words[n1:n2], "test": words[n2:]}


def texygen_split(train_lines: list[str]) -> dict[str, list[str]]:
    """coco: Texygen's own train/test files; "val" = ``COCO_DEV_SIZE`` training sentences picked by
    ``random.Random(COCO_DEV_SEED)``, the rest (in file order) "train". "test" is the shipped test
    file (its 10,000 sentences), read here so a run can never train or select on it by accident."""
    from scratchlm.datasets import dataset_path
    lines = [line for line in train_lines if line.strip()]
    dev = set(random.Random(COCO_DEV_SEED).sample(range(len(lines)), COCO_DEV_SIZE))
    test = _read_text_file(dataset_path("coco_captions_test.txt")).splitlines()
    return {"train": [l for i, l in enumerate(lines) if i not in dev], "val": [lines[i] for i in sorted(dev)],
            "test": [l for l in test if l.strip()]}


def split_documents(corpus: Corpus) -> dict[str, list[str]] | None:
    """The fixed split of a document corpus (one document per line), or None for a token stream."""
    split = getattr(corpus, "split", None)
    if split is None:
        return None
    if split == "makemore":
        return makemore_split(corpus.text.splitlines())
    if split == "texygen":
        return texygen_split(corpus.text.splitlines())
    raise ValueError(f"unknown document split {split!r}")


# ---------------------------------------------------------------- download


def download(url: str, dest, sha256: str | None = None, progress: bool = False,
             timeout: float = 30.0, chunk_size: int = 1 << 16) -> Path:
    """Fetch ``url`` to ``dest``: resumable, checksummed, atomic.

    Bytes go to ``dest + ".part"``. If a ``.part`` is already there (an earlier run was
    interrupted), ask the server for the rest with an HTTP ``Range: bytes=N-`` header; a server
    that answers 200 instead of 206 sends the whole file, so start over. When the transfer ends,
    the ``.part`` file's sha256 must equal ``sha256``: then it is renamed onto ``dest`` (atomic),
    else it is deleted and the download refused. ``dest`` therefore only ever holds a verified
    file. Works for ``http(s)://`` and ``file://`` URLs (the latter without ranges).
    """
    dest = Path(dest)
    if dest.exists():
        if sha256 is None or file_sha256(dest) == sha256:
            return dest
        dest.unlink()                                   # a corrupted cache entry: fetch again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0

    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    complete_already = False
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:                    # nothing after byte N: the .part is whole
            complete_already, response = True, None
        else:
            raise UserError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot download {url} ({reason}); check the network or the URL, "
                        f"or put the file at {dest} yourself") from None

    if not complete_already:
        with response:
            status = getattr(response, "status", None)      # None for file:// URLs
            resume_at = _range_start(response.headers.get("Content-Range")) if status == 206 else None
            if resume_at != have:                            # full body: start from byte 0
                have = 0
            length = response.headers.get("Content-Length")
            expected_end = have + int(length) if length and length.isdigit() else None
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=expected_end, initial=have, unit="B", unit_scale=True,
                           desc=f"downloading {dest.name}")
            try:
                with open(part, "ab" if have else "wb") as f:
                    while True:
                        chunk = response.read(chunk_size)
                        if not chunk:
                            break
                        f.write(chunk)
                        have += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
            except (http.client.HTTPException, OSError) as exc:
                raise UserError(f"download of {url} was interrupted after {have:,} bytes "
                                f"({type(exc).__name__}); run again to resume") from None
            finally:
                if bar is not None:
                    bar.close()
            if expected_end is not None and have < expected_end:
                raise UserError(f"download of {url} was interrupted after {have:,} of {expected_end:,} "
                                f"bytes; run again to resume")

    if sha256 is not None:
        got = file_sha256(part)
        if got != sha256:
            part.unlink()
            raise UserError(f"download of {url} has sha256 {got}, expected {sha256}; the file was "
                            f"deleted (the source changed or the transfer was corrupted)")
    os.replace(part, dest)
    return dest


def _range_start(content_range):
    """First byte of a ``Content-Range: bytes START-END/TOTAL`` header, or None."""
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", content_range or "")
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------- prepared token streams

PREPARED_FORMAT = 1


@dataclass
class Prepared:
    train: np.ndarray            # (N_train,) memmap of token ids
    val: np.ndarray              # (N_val,)
    meta: dict
    path: Path

    @property
    def tokenizer(self):
        from scratchlm.tokenizers import from_dict
        return from_dict(self.meta["tokenizer"])


def tokenizer_sha256(tokenizer) -> str:
    canonical = json.dumps(tokenizer.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    from scratchlm.checkpoint import atomic_write_bytes
    atomic_write_bytes(path, data)


def _open_stream(path: Path, dtype, n: int) -> np.ndarray:
    if n == 0:                               # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def encode_in_chunks(tokenizer, text: str, chunk_chars: int = 1 << 20, progress: bool = False) -> np.ndarray:
    """``np.asarray(tokenizer.encode(text))`` in pieces of about ``chunk_chars`` characters.

    A chunk ends right after a lone newline between two non-space characters. The BPE
    pre-tokenizer always splits there into [..x]["\n"][y..]: the newline is a whitespace piece
    of its own (a longer whitespace run would give its last character to the next word, which is
    why the newline must be alone), and the next piece starts with no space to glue. So the ids are exactly those of encoding the whole text at once,
    while the Python list of ids never holds more than one chunk (special tokens are assumed to
    contain no newline). A test checks the equality.
    """
    parts, start, n = [], 0, len(text)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, unit="char", unit_scale=True, desc="encoding")
    while start < n:
        end = n
        if start + chunk_chars < n:
            cut = _SAFE_CUT.search(text, start + chunk_chars)
            end = cut.end() if cut else n
        parts.append(np.asarray(tokenizer.encode(text[start:end]), dtype=np.int64))
        if bar is not None:
            bar.update(end - start)
        start = end
    if bar is not None:
        bar.close()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def prepare(corpus: Corpus, tokenizer, cache_dir=None, val_fraction: float = 0.1,
            rebuild: bool = False, progress: bool = False) -> Prepared:
    """Encode ``corpus`` once into ``train.bin`` / ``val.bin`` + ``meta.json``; reuse it after.

    The folder is ``<cache_dir or cache_root()/prepared>/<name>-<corpus sha>-<tokenizer sha>-val<f>``,
    so a different corpus, tokenizer or split never collides. The token stream is split by
    tokens: the first ``1 - val_fraction`` for training, the rest for validation. ids are stored
    as uint16 when the vocabulary fits (<= 65536 tokens), else uint32. ``meta.json`` is written
    last: a folder without it is an unfinished build and is rebuilt. A folder whose meta.json
    does not match (edited, truncated files, other format) is refused with a UserError saying to
    delete it or pass ``rebuild=True`` -- we do not silently overwrite what we cannot explain.
    """
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    tok_dict = tokenizer.to_dict()
    tok_sha = tokenizer_sha256(tokenizer)
    dtype = "uint16" if tokenizer.vocab_size <= 65536 else "uint32"
    safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", corpus.name)[:40] or "corpus"
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "prepared"
    folder = root / f"{safe_name}-{corpus.sha256[:16]}-{tok_sha[:16]}-val{val_fraction:g}"
    meta_path = folder / "meta.json"
    want = {"format": PREPARED_FORMAT, "source_sha256": corpus.sha256, "tokenizer_sha256": tok_sha,
            "val_fraction": val_fraction, "dtype": dtype, "vocab_size": tokenizer.vocab_size}

    if meta_path.exists() and not rebuild:
        return _reuse(folder, want)

    folder.mkdir(parents=True, exist_ok=True)
    ids = encode_in_chunks(tokenizer, corpus.text, progress=progress)    # (N,)
    n_train = len(ids) - int(round(len(ids) * val_fraction))
    train, val = ids[:n_train].astype(dtype), ids[n_train:].astype(dtype)
    _atomic_write_bytes(folder / "train.bin", train.tobytes())
    _atomic_write_bytes(folder / "val.bin", val.tobytes())
    meta = dict(want, corpus=corpus.name, source=corpus.source, source_chars=len(corpus.text),
                n_tokens=int(len(ids)), train_tokens=int(len(train)), val_tokens=int(len(val)),
                split="by tokens: first (1 - val_fraction) train, rest val", tokenizer=tok_dict)
    _atomic_write_bytes(meta_path, (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return Prepared(_open_stream(folder / "train.bin", dtype, len(train)),
                    _open_stream(folder / "val.bin", dtype, len(val)), meta, folder)


def _reuse(folder: Path, want: dict) -> Prepared:
    fix = f"delete {folder} or prepare with rebuild=True"
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"prepared cache {folder}/meta.json is unreadable ({exc}); {fix}") from None
    if not isinstance(meta, dict):
        raise UserError(f"prepared cache {folder}/meta.json is not a JSON object; {fix}")
    for key, value in want.items():
        if meta.get(key) != value:
            raise UserError(f"prepared cache {folder} has {key}={meta.get(key)!r}, expected {value!r}; {fix}")
    itemsize = np.dtype(want["dtype"]).itemsize
    streams = []
    for split in ("train", "val"):
        n = meta.get(f"{split}_tokens")
        path = folder / f"{split}.bin"
        size = path.stat().st_size if path.exists() else -1
        if not isinstance(n, int) or size != n * itemsize:
            raise UserError(f"prepared cache {path} has {size} bytes, meta.json says {n} tokens "
                            f"of {itemsize} bytes; {fix}")
        streams.append(_open_stream(path, want["dtype"], n))
    return Prepared(streams[0], streams[1], meta, folder)


# ---------------------------------------------------------------- batches


class BatchSampler:
    """Random windows of a token stream: ``batch(step) -> (x, y)``, both (B, T) int64.

    Batch ``step`` depends only on ``(seed, step)``: its generator is seeded with the pair, so a
    resumed run needs only the step number (``state_dict()`` is just the seed and sizes), and
    the batches are the same on NumPy and CuPy because the draws happen on the host.

    Row b is ``tokens[s_b : s_b + T]`` and its targets ``tokens[s_b + 1 : s_b + T + 1]`` with
    ``s_b`` uniform in ``[0, N - T - 1]``, so every window, target included, lies in the stream.
    """

    def __init__(self, tokens, batch_size: int, block_size: int, seed: int = 0, name: str = "token stream"):
        for label, value in (("batch_size", batch_size), ("block_size", block_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise UserError(f"{label} must be a positive integer, got {value!r}")
        n = len(tokens)
        if n < block_size + 1:
            raise UserError(f"{name} has {n} tokens, fewer than block_size + 1 = {block_size + 1}; "
                            f"use a smaller block_size or a bigger corpus")
        self.tokens = tokens
        self.batch_size, self.block_size, self.seed = int(batch_size), int(block_size), int(seed)
        self._offsets = np.arange(self.block_size + 1)                   # (T+1,)

    def batch(self, step: int):
        B, T = self.batch_size, self.block_size
        rng = np.random.default_rng([self.seed, int(step)])
        starts = rng.integers(0, len(self.tokens) - T, size=B)          # (B,) in [0, N - T - 1]
        window = np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64)  # (B, T+1)
        x, y = window[:, :-1], window[:, 1:]                            # (B, T), (B, T)
        return backend.to_device(np.ascontiguousarray(x)), backend.to_device(np.ascontiguousarray(y))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "block_size": self.block_size}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
