"""WordTokenizer: splitting worked out by hand, vocabulary order and limits, unknown words,
JSON round trip through the shared loader, make_tokenizer specs, and the user's errors."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from scratchlm.errors import UserError
from scratchlm.tokenizers import WordTokenizer, from_dict, load, make_tokenizer
from scratchlm.tokenizers.word import split_words

TEXT = "The food was great! The service was slow, the food cold.\nI don't like it... at ALL"


def test_split_lowercases_and_cuts_punctuation_off_by_hand():
    assert split_words("The FOOD, great!!") == ["the", "food", ",", "great", "!", "!"]
    assert split_words("I don't like it... (really)") == \
        ["i", "don't", "like", "it", ".", ".", ".", "(", "really", ")"]
    assert split_words("  \t\n ") == []
    assert split_words("snake_case 42x") == ["snake", "_", "case", "42x"]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.text())
def test_split_loses_only_whitespace(text):
    # Every non-space character of the lowercased text lands in exactly one token, in order.
    pieces = split_words(text)
    assert "".join(pieces) == "".join(ch for ch in text.lower() if not ch.isspace())
    assert all(p and not any(c.isspace() for c in p) for p in pieces)


def test_vocabulary_order_specials_min_count_and_max_size():
    tok = WordTokenizer.from_text(TEXT, min_count=2, specials=("<cls>", "<bos>"))
    # Specials first in fixed order (<pad>=0, <unk>=1, then <bos> before <cls>), then by count, ties a-z.
    # Counts: the 3, food 2, was 2, . 4 ("." once + "..." three), others 1.
    assert tok.itos == ["<pad>", "<unk>", "<bos>", "<cls>", ".", "the", "food", "was"]
    assert tok.token_id("<cls>") == 3 and tok.pad_id == 0 and tok.unk_id == 1
    small = WordTokenizer.from_text(TEXT, min_count=1, max_size=4)
    assert small.itos == ["<pad>", "<unk>", ".", "the"] and small.vocab_size == 4


def test_unknown_words_map_to_unk_and_are_counted():
    tok = WordTokenizer.from_text(TEXT, min_count=2)
    ids, n_unknown = tok.encode("The soup was awful.", count_unknown=True)
    assert ids == [tok.stoi["the"], 1, tok.stoi["was"], 1, tok.stoi["."]]
    assert n_unknown == 2
    assert tok.encode("The soup was awful.") == ids
    assert tok.decode(ids) == "the <unk> was <unk>."
    assert tok.decode([0, 0] + ids[:1]) == "the"            # padding is skipped


def test_json_round_trip_through_the_shared_loader(tmp_path):
    tok = WordTokenizer.from_text(TEXT, min_count=1, specials=("<eos>",))
    back = from_dict(tok.to_dict())
    assert isinstance(back, WordTokenizer) and back.itos == tok.itos
    tok.save(tmp_path / "tokenizer.json")
    loaded = load(tmp_path / "tokenizer.json")
    assert loaded.itos == tok.itos and loaded.encode(TEXT) == tok.encode(TEXT)
    assert loaded.specials == ["<eos>"]


def test_make_tokenizer_specs():
    assert make_tokenizer("word", TEXT).min_count == 2
    tok = make_tokenizer("word:1", TEXT)
    assert tok.min_count == 1 and "cold" in tok.stoi
    with pytest.raises(UserError, match="not a minimum count"):
        make_tokenizer("word:x", TEXT)


def test_errors_a_user_can_cause():
    with pytest.raises(UserError, match="min_count"):
        WordTokenizer.from_text(TEXT, min_count=50)
    with pytest.raises(UserError, match="special token"):
        WordTokenizer.from_text(TEXT, specials=("<sep>",))
    with pytest.raises(UserError, match="max_size"):
        WordTokenizer.from_text(TEXT, max_size=2)
    tok = WordTokenizer.from_text(TEXT)
    with pytest.raises(UserError, match="outside the word vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(UserError, match="not in the word vocabulary"):
        tok.token_id("<bos>")
    bad = tok.to_dict()
    bad["vocab_size"] += 1
    with pytest.raises(UserError, match="vocab_size"):
        from_dict(bad)
