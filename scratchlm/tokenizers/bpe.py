"""Byte-level BPE (the GPT-2 tokenizer's algorithm), trained from scratch.

Vocabulary: ids 0..255 are the 256 single bytes, so every string (and every byte string)
can be encoded; ids 256.. are merged tokens in the order they were learned; special tokens
(``<|endoftext|>``) come last. Encoding never fails and ``decode(encode(s)) == s`` for every
Unicode string ``s``.

Training, in four steps:

1. Special tokens are cut out of the text first, so ``<|endoftext|>`` never takes part in a merge.
2. Pre-tokenize: split the text into "words" with a GPT-2 style regex (letters, numbers,
   punctuation runs, whitespace kept apart, a leading space glued to the word after it).
   Merges never cross a word boundary, so " the" and "the," cannot fuse into one token.
3. Count the distinct words with their multiplicity: tiny shakespeare's 1.1 MB is ~290k
   words but only ~25k distinct ones, and each distinct word is worked on once per merge.
4. Merge loop, with incremental pair counts instead of a recount per merge:
   ``pair_count[(a, b)]`` = occurrences of the adjacent pair summed over words (times the
   word's count) and ``where[(a, b)]`` = the ids of the words that contain it. Merging (a, b)
   only touches the words in ``where[(a, b)]``: subtract their old pairs, rewrite them with the
   new token, add their new pairs. A heap of ``(-count, a, b)`` with lazy deletion (an entry is
   stale when its count no longer matches ``pair_count``) finds the next merge: the highest
   count, ties broken by the smallest (a, b) -- deterministic, independent of dict order.

Encoding splits the text the same way, and for each word applies merges lowest rank first until
none applies (which reproduces the training segmentation); results are cached per word.

The pre-tokenizer. GPT-2's pattern is
``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``.
The standard library ``re`` has no ``\\p{..}`` classes, so we approximate them with ``str``
classes: letters ``\\p{L}`` -> ``[^\\W\\d_]`` (word characters that are neither decimal digits nor
the underscore) and numbers ``\\p{N}`` -> ``\\d`` (decimal digits). The differences from GPT-2:
non-decimal numerals such as "²" or "Ⅻ" count as letters here, and combining marks (which
Python's ``\\w`` excludes, as does ``\\p{L}``) fall into the punctuation class in both. Every
character lands in exactly one class, so the pieces always concatenate back to the input
(a test checks this). Like GPT-2, the contractions are case-sensitive.
"""
from __future__ import annotations

import codecs
import heapq
import operator
import re
from collections import Counter

from scratchlm.errors import UserError
from scratchlm.tokenizers.base import Tokenizer, check_header, register

VERSION = 1
PRETOKENIZER_NAME = "gpt2-stdlib-re-v1"
PRETOKENIZE = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def pretokenize(text: str) -> list[str]:
    """Split ``text`` into words; ``"".join(pretokenize(t)) == t`` for every string."""
    return PRETOKENIZE.findall(text)


def _byte_alphabet() -> list[str]:
    """One printable character per byte, for writing tokens in JSON (GPT-2's trick).

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, NBSP, soft
    hyphen) are shifted to U+0100.. so that a space shows as "Ġ" and a newline as "Ċ". No
    token string then contains a real space, so a merge is written "left right".
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    alphabet, shifted = [], 0
    for byte in range(256):
        if byte in keep:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return alphabet


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def bytes_to_readable(data: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in data)


def readable_to_bytes(text: str) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError as exc:
        raise UserError(f"BPE token {text!r} has character {exc.args[0]!r} outside the byte alphabet") from None


def _merge_word(word: list[int], a: int, b: int, new_id: int):
    """``word`` with every adjacent (a, b) replaced by ``new_id``, left to right; None if absent."""
    out, i, n, found = [], 0, len(word), False
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
            found = True
        else:
            out.append(word[i])
            i += 1
    return out if found else None


def _check_specials(special_tokens) -> list[str]:
    specials = list(special_tokens or ())
    for s in specials:
        if not isinstance(s, str) or not s:
            raise UserError(f"special token {s!r} must be a non-empty string")
    if len(set(specials)) != len(specials):
        raise UserError(f"special tokens {specials} have a repeat")
    return specials


@register("byte_level_bpe")
class ByteLevelBPE(Tokenizer):
    """Byte-level BPE. Build with ``ByteLevelBPE.train(text, vocab_size)`` or ``load(path)``.

        >>> tok = ByteLevelBPE.train("hug hug hug pug pun", vocab_size=260, special_tokens=())
        >>> [tok.decode([i]) for i in range(256, 260)]
        ['ug', 'hug', ' p', ' hug']
        >>> tok.encode(" hug pug")
        [259, 258, 256]
    """

    def __init__(self, merges, special_tokens=("<|endoftext|>",)):
        """``merges``: list of (left id, right id) in learned order. Ids of merged tokens follow
        from replaying them: a merge whose bytes already exist as a token reuses that id
        (two segmentations of the same bytes), otherwise it takes the next free id."""
        self.token_bytes: list[bytes] = [bytes([b]) for b in range(256)]   # id -> bytes
        bytes_to_id = {tb: i for i, tb in enumerate(self.token_bytes)}
        self.merges: list[tuple[int, int]] = []
        self.ranks: dict[tuple[int, int], tuple[int, int]] = {}             # pair -> (rank, new id)
        for rank, (a, b) in enumerate(merges):
            a, b = int(a), int(b)
            if not (0 <= a < len(self.token_bytes) and 0 <= b < len(self.token_bytes)):
                raise UserError(f"BPE merge {rank} refers to token ids ({a}, {b}) that do not exist yet")
            merged = self.token_bytes[a] + self.token_bytes[b]
            new_id = bytes_to_id.get(merged)
            if new_id is None:
                new_id = len(self.token_bytes)
                self.token_bytes.append(merged)
                bytes_to_id[merged] = new_id
            self.merges.append((a, b))
            self.ranks.setdefault((a, b), (rank, new_id))
        self.special_tokens = _check_specials(special_tokens)
        self.special_ids = {}
        for s in self.special_tokens:
            self.special_ids[s] = len(self.token_bytes)
            self.token_bytes.append(s.encode("utf-8"))
        self.vocab_size = len(self.token_bytes)
        # Longest first, so that a special token that contains another one wins.
        self._special_split = (re.compile("(" + "|".join(
            re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)) + ")")
            if self.special_tokens else None)
        self._cache: dict[str, list[int]] = {}        # word -> ids (encode)
        self._bytes_cache: dict[bytes, list[int]] = {}  # raw-bytes word -> ids (encode_bytes)

    # ------------------------------------------------------------------ training

    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens=("<|endoftext|>",),
              progress: bool = False) -> "ByteLevelBPE":
        """Learn merges on ``text`` until the vocabulary (bytes + merges + specials) has
        ``vocab_size`` tokens, or until no adjacent pair is left to merge (a tiny corpus: the
        vocabulary is then smaller, so check ``.vocab_size``)."""
        specials = _check_specials(special_tokens)
        try:
            vocab_size = operator.index(vocab_size)        # ints and NumPy ints, not floats
        except TypeError:
            raise UserError(f"BPE vocab_size must be an integer, got {vocab_size!r}") from None
        if vocab_size < 256 + len(specials):
            raise UserError(f"BPE vocab_size must be at least 256 (one token per byte) + "
                            f"{len(specials)} special token(s) = {256 + len(specials)}, got {vocab_size}")
        target = vocab_size - len(specials)          # byte tokens + merged tokens

        # 1-3: cut out specials, pre-tokenize, count distinct words.
        word_counts: Counter = Counter()
        chunks = cls._split_on(specials, text)
        for k, chunk in enumerate(chunks):
            if k % 2 == 0:                           # even chunks are text, odd ones specials
                word_counts.update(PRETOKENIZE.findall(chunk))
        words = [list(w.encode("utf-8", "surrogatepass")) for w in word_counts]
        counts = list(word_counts.values())

        # 4: incremental pair statistics.
        pair_count: dict[tuple[int, int], int] = {}
        where: dict[tuple[int, int], set[int]] = {}
        for wid, word in enumerate(words):
            c = counts[wid]
            for pair in zip(word, word[1:]):
                pair_count[pair] = pair_count.get(pair, 0) + c
                where.setdefault(pair, set()).add(wid)
        heap = [(-c, pair) for pair, c in pair_count.items()]
        heapq.heapify(heap)

        token_bytes = [bytes([b]) for b in range(256)]
        bytes_to_id = {tb: i for i, tb in enumerate(token_bytes)}
        merges: list[tuple[int, int]] = []
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=target - 256, desc="BPE merges", unit="merge")
        while len(token_bytes) < target and heap:
            neg_count, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -neg_count:
                continue                              # stale heap entry
            a, b = pair
            merged = token_bytes[a] + token_bytes[b]
            new_id = bytes_to_id.get(merged)
            if new_id is None:
                new_id = len(token_bytes)
                token_bytes.append(merged)
                bytes_to_id[merged] = new_id
                if bar is not None:
                    bar.update(1)
            merges.append(pair)
            delta: dict[tuple[int, int], int] = {}
            for wid in sorted(where.pop(pair)):
                word = words[wid]
                new_word = _merge_word(word, a, b, new_id)
                if new_word is None:                  # stale: the pair left this word earlier
                    continue
                c = counts[wid]
                for p in zip(word, word[1:]):
                    delta[p] = delta.get(p, 0) - c
                for p in zip(new_word, new_word[1:]):
                    delta[p] = delta.get(p, 0) + c
                    where.setdefault(p, set()).add(wid)
                words[wid] = new_word
            for p, d in delta.items():
                if d == 0:
                    continue
                c = pair_count.get(p, 0) + d
                if c > 0:
                    pair_count[p] = c
                    heapq.heappush(heap, (-c, p))
                else:
                    pair_count.pop(p, None)
        if bar is not None:
            bar.close()
        return cls(merges, specials)

    # ------------------------------------------------------------------ encoding

    @staticmethod
    def _split_on(specials, text):
        """[text, special, text, special, ..., text]: even items plain text, odd items specials."""
        if not specials:
            return [text]
        pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
        return re.split(pattern, text)

    def _bpe(self, data: bytes) -> list[int]:
        """Merge the bytes of one word, lowest-rank pair first, until no merge applies."""
        ids = list(data)
        ranks = self.ranks
        no_merge = (1 << 62, -1)
        while len(ids) > 1:
            best_pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, no_merge))
            rank_and_id = ranks.get(best_pair)
            if rank_and_id is None:
                break
            ids = _merge_word(ids, best_pair[0], best_pair[1], rank_and_id[1])
        return ids

    def _chunks(self, text):
        if self._special_split is None:
            return [text]
        return self._special_split.split(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text become their ids."""
        out: list[int] = []
        cache, special_ids = self._cache, self.special_ids
        for k, chunk in enumerate(self._chunks(text)):
            if k % 2 == 1:
                out.append(special_ids[chunk])
                continue
            for word in PRETOKENIZE.findall(chunk):
                ids = cache.get(word)
                if ids is None:
                    # surrogatepass: a lone surrogate still encodes (to 3 bytes) instead of failing.
                    ids = self._bpe(word.encode("utf-8", "surrogatepass"))
                    if len(cache) < 1_000_000:
                        cache[word] = ids
                out.extend(ids)
        return out

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of arbitrary bytes (invalid UTF-8 included); ``decode_bytes`` inverts it.

        The bytes are decoded with ``surrogateescape`` (each invalid byte becomes one lone
        surrogate, a "punctuation" character to the pre-tokenizer) and every word is encoded
        back to exactly its original bytes.
        """
        text = bytes(data).decode("utf-8", "surrogateescape")
        out: list[int] = []
        cache, special_ids = self._bytes_cache, self.special_ids
        for k, chunk in enumerate(self._chunks(text)):
            if k % 2 == 1:
                out.append(special_ids[chunk])
                continue
            for word in PRETOKENIZE.findall(chunk):
                raw = word.encode("utf-8", "surrogateescape")
                ids = cache.get(raw)
                if ids is None:
                    ids = self._bpe(raw)
                    if len(cache) < 1_000_000:
                        cache[raw] = ids
                out.extend(ids)
        return out

    # ------------------------------------------------------------------ decoding

    def decode_bytes(self, ids) -> bytes:
        """The bytes the ids stand for (may end mid-character: that is what streaming needs)."""
        table = self.token_bytes
        try:
            return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            pass
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise UserError(f"token id {i} is outside the BPE vocabulary (0..{self.vocab_size - 1})")
        return b"".join([table[int(i)] for i in ids])

    def decode(self, ids) -> str:
        """Text of the ids; bytes that do not form UTF-8 (ids cut a character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        """A decoder for tokens that arrive one at a time (generation): see ``StreamDecoder``."""
        return StreamDecoder(self)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        merges = [f"{bytes_to_readable(self.token_bytes[a])} {bytes_to_readable(self.token_bytes[b])}"
                  for a, b in self.merges]
        return {
            "type": "byte_level_bpe",
            "version": VERSION,
            "vocab_size": self.vocab_size,
            "pretokenizer": PRETOKENIZER_NAME,
            "byte_alphabet": "gpt2 bytes_to_unicode: printable Latin-1 bytes as themselves, others from U+0100",
            "special_tokens": dict(self.special_ids),
            "merges": merges,
        }

    @classmethod
    def from_dict(cls, d) -> "ByteLevelBPE":
        check_header(d, "byte_level_bpe", VERSION)
        if d.get("pretokenizer") != PRETOKENIZER_NAME:
            raise UserError(f"BPE tokenizer uses pre-tokenizer {d.get('pretokenizer')!r}; this scratchlm "
                            f"has {PRETOKENIZER_NAME!r} (retrain the tokenizer)")
        merges_text, specials = d.get("merges"), d.get("special_tokens", {})
        if not isinstance(merges_text, list) or not isinstance(specials, dict) or \
                not all(isinstance(i, int) for i in specials.values()):
            raise UserError("BPE tokenizer data needs a \"merges\" list and a \"special_tokens\" "
                            "object mapping each special token to its integer id")
        token_ids = {bytes([b]): b for b in range(256)}
        merges = []
        for rank, line in enumerate(merges_text):
            parts = line.split(" ") if isinstance(line, str) else []
            if len(parts) != 2:
                raise UserError(f"BPE merge {rank} is {line!r}; expected two tokens separated by one space")
            left, right = readable_to_bytes(parts[0]), readable_to_bytes(parts[1])
            if left not in token_ids or right not in token_ids:
                raise UserError(f"BPE merge {rank} ({line!r}) uses a token no earlier merge made")
            merges.append((token_ids[left], token_ids[right]))
            token_ids.setdefault(left + right, len(token_ids))
        ordered = sorted(specials.items(), key=lambda kv: kv[1])
        tok = cls(merges, [s for s, _ in ordered])
        if tok.special_ids != specials:
            raise UserError(f"BPE special token ids {specials} do not follow the merges "
                            f"(expected {tok.special_ids})")
        if d.get("vocab_size") != tok.vocab_size:
            raise UserError(f"BPE tokenizer says vocab_size {d.get('vocab_size')} but its merges and "
                            f"special tokens make {tok.vocab_size}")
        return tok

    def __repr__(self) -> str:
        return f"ByteLevelBPE(vocab_size={self.vocab_size}, merges={len(self.merges)})"


class StreamDecoder:
    """Turn token ids into text as they arrive, holding back bytes until they form UTF-8.

    One token can end halfway through a multi-byte character ("é" may be two tokens); printing
    each token's ``decode`` would show U+FFFD twice. ``push`` returns only complete characters
    and keeps the tail for the next call; ``flush`` replaces whatever incomplete tail is left.

        >>> tok = ByteLevelBPE.train("abc", vocab_size=256, special_tokens=())
        >>> stream = tok.stream_decoder()
        >>> [stream.push([i]) for i in tok.encode("é!")], stream.flush()
        (['', 'é', '!'], '')
    """

    def __init__(self, tokenizer: ByteLevelBPE):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids) -> str:
        return self._decoder.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
