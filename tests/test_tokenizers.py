"""Tokenizers: round trips (Hypothesis), merges checked by hand and against a naive trainer,
determinism, JSON save/load, and the errors a user can cause."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from scratchlm.errors import UserError
from scratchlm.tokenizers import (ByteLevelBPE, CharTokenizer, from_dict, load, make_tokenizer,
                                  pretokenize)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)

# A small corpus with several scripts, digits, punctuation and runs of whitespace.
SMALL_CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?\n"
    "  Indented   line\twith tabs\n\n"
    "Ünïcödé: café, naïve, 東京, Москва, ελληνικά, emoji 🙂🙂!\n"
    "x_1 = foo(bar) + 42  # comment\n"
) * 8


@pytest.fixture(scope="module")
def small_bpe():
    return ByteLevelBPE.train(SMALL_CORPUS, vocab_size=400)


# ---------------------------------------------------------------- the pre-tokenizer

@SETTINGS
@given(st.text())
def test_pretokenize_pieces_concatenate_back_to_the_text(text):
    assert "".join(pretokenize(text)) == text


def test_pretokenize_keeps_words_numbers_punctuation_and_spaces_apart():
    # What GPT-2's \p{L}/\p{N} pattern gives for this sentence, worked out by hand.
    assert pretokenize("Hello, world! It's 2024.  Go") == \
        ["Hello", ",", " world", "!", " It", "'s", " 2024", ".", " ", " Go"]
    assert pretokenize("café_x\n\n") == ["café", "_", "x", "\n\n"]


# ---------------------------------------------------------------- BPE merges

def test_bpe_first_merges_on_a_hand_checked_corpus():
    # Words: "hug" x1, " hug" x2, " pug" x1, " pun" x1.
    # Pair counts: (u,g) 4, (h,u) 3, (' ',h) 2, (' ',p) 2, (p,u) 2, (u,n) 1  -> merge 1: "ug".
    # Then (h,ug) 3, (' ',h) 2, (' ',p) 2, ...                               -> merge 2: "hug".
    # Then (' ',hug) 2 and (' ',p) 2 tie; the smaller pair (32, 112) wins     -> merge 3: " p".
    # Then (' ',hug) 2                                                         -> merge 4: " hug".
    tok = ByteLevelBPE.train("hug hug hug pug pun", vocab_size=260, special_tokens=())
    space, h, u, g, p = 32, ord("h"), ord("u"), ord("g"), ord("p")
    assert tok.merges == [(u, g), (h, 256), (space, p), (space, 257)]
    assert [tok.token_bytes[i] for i in range(256, 260)] == [b"ug", b"hug", b" p", b" hug"]
    assert tok.encode("hug pug pun") == [257, 258, 256, 258, u, ord("n")]


def naive_bpe_merges(text, n_tokens):
    """Reference trainer: recount every pair of every word before each merge (slow, obvious)."""
    words = Counter(pretokenize(text))
    seqs = {w: list(w.encode("utf-8")) for w in words}
    token_bytes = [bytes([b]) for b in range(256)]
    merges = []
    while len(token_bytes) < n_tokens:
        counts = Counter()
        for w, seq in seqs.items():
            for pair in zip(seq, seq[1:]):
                counts[pair] += words[w]
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merged = token_bytes[best[0]] + token_bytes[best[1]]
        if merged in token_bytes:
            new_id = token_bytes.index(merged)
        else:
            new_id = len(token_bytes)
            token_bytes.append(merged)
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.text(alphabet="ab c\n.é", max_size=80), st.integers(256, 300))
def test_incremental_bpe_training_equals_the_naive_recount(text, vocab_size):
    tok = ByteLevelBPE.train(text, vocab_size=vocab_size, special_tokens=())
    assert tok.merges == naive_bpe_merges(text, vocab_size)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.text(alphabet="ab c\n.", max_size=60))
def test_encode_equals_applying_every_merge_in_training_order(text):
    tok = ByteLevelBPE.train("abc abc ab. c\nab ca bc" * 3, vocab_size=280, special_tokens=())
    expected = []
    for word in pretokenize(text):
        seq = list(word.encode("utf-8"))
        for a, b in tok.merges:
            new_id = tok.ranks[(a, b)][1]
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seq = out
        expected += seq
    assert tok.encode(text) == expected


def test_bpe_training_is_deterministic():
    a = ByteLevelBPE.train(SMALL_CORPUS, vocab_size=350)
    b = ByteLevelBPE.train(SMALL_CORPUS, vocab_size=350)
    assert a.merges == b.merges and a.to_dict() == b.to_dict()
    assert a.vocab_size == 350


def test_every_token_has_distinct_bytes_and_merges_stay_inside_words(small_bpe):
    normal = small_bpe.token_bytes[:small_bpe.vocab_size - len(small_bpe.special_tokens)]
    assert len(set(normal)) == len(normal)
    for token in normal[256:]:          # a merged token lies inside one pre-tokenized word
        text = token.decode("utf-8", errors="ignore")
        assert len(pretokenize(text)) <= 1 or text.strip() == ""


def test_bpe_compresses_its_training_text(small_bpe):
    ids = small_bpe.encode(SMALL_CORPUS)
    assert len(ids) < len(SMALL_CORPUS.encode("utf-8")) / 2


# ---------------------------------------------------------------- BPE round trips

@SETTINGS
@given(st.text())
def test_bpe_round_trips_any_text(small_bpe, text):
    ids = small_bpe.encode(text)
    assert all(0 <= i < small_bpe.vocab_size for i in ids)
    assert small_bpe.decode(ids) == text
    assert small_bpe.decode_bytes(ids) == text.encode("utf-8")


@SETTINGS
@given(st.binary())
def test_bpe_round_trips_any_bytes_including_invalid_utf8(small_bpe, data):
    assert small_bpe.decode_bytes(small_bpe.encode_bytes(data)) == data


def test_bpe_decode_replaces_only_a_cut_character(small_bpe):
    ids = small_bpe.encode_bytes("é".encode("utf-8")[:1] + b"ok")
    assert small_bpe.decode(ids) == "\ufffdok"


def test_stream_decoder_holds_bytes_until_a_character_is_complete(small_bpe):
    text = "naïve 東京 🙂 ok"
    ids = small_bpe.encode_bytes(text.encode("utf-8"))
    ids = [i for i in ids]
    # Force single-byte tokens so characters are certainly split across pushes.
    byte_ids = list(text.encode("utf-8"))
    for sequence in (ids, byte_ids):
        stream = small_bpe.stream_decoder()
        pieces = [stream.push([i]) for i in sequence] + [stream.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in piece for piece in pieces)


def test_special_tokens_are_matched_before_pretokenization_and_never_merged():
    text = "hello<|endoftext|>hello<|endoftext|>" * 20
    tok = ByteLevelBPE.train(text, vocab_size=300)
    eot = tok.special_ids["<|endoftext|>"]
    assert eot == tok.vocab_size - 1
    assert tok.encode("<|endoftext|>") == [eot]
    ids = tok.encode("a<|endoftext|>b")
    assert ids == [ord("a"), eot, ord("b")]
    assert tok.decode(ids) == "a<|endoftext|>b"
    assert not any(b"<" in tb for tb in tok.token_bytes[256:eot])


def test_bpe_stops_early_when_nothing_is_left_to_merge():
    tok = ByteLevelBPE.train("ab", vocab_size=1000, special_tokens=())
    assert tok.vocab_size == 257 and tok.decode(tok.encode("ab")) == "ab"


# ---------------------------------------------------------------- char tokenizer

CHAR_VOCAB_TEXT = "hello world\nÜber 東京!"


@SETTINGS
@given(st.text(alphabet=sorted(set(CHAR_VOCAB_TEXT))))
def test_char_round_trips_text_in_its_vocabulary(text):
    tok = CharTokenizer.from_text(CHAR_VOCAB_TEXT)
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text


def test_char_vocabulary_is_sorted_distinct_characters():
    tok = CharTokenizer.from_text("banana")
    assert tok.chars == ["a", "b", "n"] and tok.vocab_size == 3
    assert tok.encode("nab") == [2, 0, 1]


def test_char_unknown_character_names_it_and_its_position():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match=r"'z'.*position 2"):
        tok.encode("abz")


# ---------------------------------------------------------------- save / load

@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip(tmp_path, small_bpe, kind):
    tok = small_bpe if kind == "bpe" else CharTokenizer.from_text(SMALL_CORPUS)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    again = load(path)
    assert type(again) is type(tok) and again.to_dict() == tok.to_dict()
    assert again.encode(SMALL_CORPUS) == tok.encode(SMALL_CORPUS)
    assert from_dict(json.loads(path.read_text(encoding="utf-8"))).vocab_size == tok.vocab_size
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]     # no temp file left


def test_bpe_json_merges_are_readable(small_bpe):
    d = small_bpe.to_dict()
    assert d["type"] == "byte_level_bpe" and d["version"] == 1
    assert all(isinstance(m, str) and m.count(" ") == 1 for m in d["merges"])
    assert "Ġ" in "".join(d["merges"])       # a space is written as Ġ, GPT-2 style


def corrupt(d, **changes):
    d = json.loads(json.dumps(d))
    d.update(changes)
    return d


@pytest.mark.parametrize("change", [
    {"type": "wordpiece"}, {"version": 99}, {"merges": ["a b c"]}, {"merges": ["ab c"]},
    {"vocab_size": 5}, {"special_tokens": {"<|endoftext|>": 3}}, {"pretokenizer": "other"},
    {"merges": "not a list"}, {"special_tokens": {"<|endoftext|>": "x"}}, {"merges": [" a"]},
])
def test_mismatched_bpe_data_is_a_user_error(small_bpe, change):
    with pytest.raises(UserError):
        from_dict(corrupt(small_bpe.to_dict(), **change))


@pytest.mark.parametrize("change", [{"chars": ["a", "a"]}, {"chars": ["ab"]}, {"vocab_size": 7},
                                    {"version": 0}, {"chars": None}])
def test_mismatched_char_data_is_a_user_error(change):
    with pytest.raises(UserError):
        from_dict(corrupt(CharTokenizer.from_text("abc").to_dict(), **change))


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="not valid JSON"):
        load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserError):
        load(tmp_path / "list.json")


def test_decoding_an_unknown_id_is_a_user_error(small_bpe):
    with pytest.raises(UserError, match="outside"):
        small_bpe.decode([small_bpe.vocab_size])
    with pytest.raises(UserError, match="outside"):
        CharTokenizer.from_text("ab").decode([2])


# ---------------------------------------------------------------- make_tokenizer and bad sizes

def test_make_tokenizer_specs():
    assert isinstance(make_tokenizer("char", "abc"), CharTokenizer)
    assert make_tokenizer("bpe:300", SMALL_CORPUS).vocab_size == 300
    assert make_tokenizer("bpe", SMALL_CORPUS * 4).vocab_size <= 1024


@pytest.mark.parametrize("spec", ["", "wordpiece", "bpe:abc", "char:5", "bpe:100", "bpe:256"])
def test_bad_tokenizer_specs_and_sizes_are_user_errors(spec):
    with pytest.raises(UserError):
        make_tokenizer(spec, SMALL_CORPUS)


def test_bpe_vocab_below_bytes_plus_specials_is_refused():
    with pytest.raises(UserError, match="at least 256"):
        ByteLevelBPE.train("abc", vocab_size=255, special_tokens=())
    with pytest.raises(UserError, match="257"):
        ByteLevelBPE.train("abc", vocab_size=256)
    assert ByteLevelBPE.train("abc", vocab_size=257).vocab_size == 257
    with pytest.raises(UserError, match="integer"):
        ByteLevelBPE.train("abc", vocab_size=300.0)


def test_char_tokenizer_of_empty_text_is_refused():
    with pytest.raises(UserError, match="empty"):
        CharTokenizer.from_text("")
