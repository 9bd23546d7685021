"""scratchlm.generate: KV cache, sliding window, sampling controls, stop strings, streaming.

Oracles: the model's own full forward (no cache) at every position; a naive greedy loop written
here that recomputes the whole window each step with the documented sliding rule; hand-computed
logits for the repetition penalty and the filters; the full decode of the same ids for streaming
(the incremental UTF-8 decoder must agree with one-shot decoding), and Python's ``str.find`` for
stop strings.
"""
import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchlm as sl
from scratchlm import backend
from scratchlm import generate as G
from scratchlm.errors import UserError
from scratchlm.models import GPT, GPTConfig
from scratchlm.tokenizers import ByteLevelBPE, CharTokenizer

TINY = dict(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)


def tiny(seed=0, **overrides):
    return GPT(GPTConfig(**{**TINY, **overrides}), seed=seed)


def host(array):
    """A Tensor's or a backend array's values on the host (NumPy)."""
    return backend.to_numpy(array.data if isinstance(array, sl.Tensor) else array)


def naive_greedy(model, prompt, steps, keep=None):
    """Greedy decoding the slow, obvious way: a full forward over the window every step. The window
    is the last block_size tokens of the prompt; when a new token does not fit, it becomes the
    last ``keep`` tokens (default block_size: the classic crop)."""
    block = model.config.block_size
    keep = keep or block
    ids = np.array(prompt)
    start = max(0, ids.shape[1] - block)
    for _ in range(steps):
        logits, _ = model(ids[:, start:])
        ids = np.concatenate([ids, host(logits)[:, -1].argmax(-1)[:, None]], axis=1)
        if ids.shape[1] - start > block:
            start = ids.shape[1] - keep
    return ids


# ---------------------------------------------------------------------- the KV cache

def test_cached_logits_equal_the_full_forward_at_every_position(any_backend):
    """prefill + decode steps give the logits that model(ids) gives at each position (float64)."""
    model = tiny()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY["vocab_size"], (2, 8))
    full, _ = model(ids)                                                     # (B, T, V)
    full = host(full)
    for prompt_len in (1, 3, 7):
        cache = G.KVCache(model.config, batch_size=2)
        steps = [G.prefill(model, ids[:, :prompt_len], cache)]
        for t in range(prompt_len, 8):
            steps.append(G.decode_step(model, ids[:, t], cache))
        assert cache.length == 8
        np.testing.assert_allclose(np.stack(steps, axis=1), full[:, prompt_len - 1:], rtol=0, atol=1e-10)


def test_forward_with_a_cache_continues_positions(float64):
    """GPT.forward(idx, cache=...) on the prompt then on one more token = the last rows of model(all)."""
    model = tiny(positional="sinusoidal")
    ids = np.array([[3, 1, 4, 1, 5]])
    full = host(model(ids)[0])
    cache = G.KVCache(model.config)
    with sl.no_grad():
        head = host(model(ids[:, :4], cache=cache)[0])
        tail = host(model(ids[:, 4:], cache=cache)[0])
    np.testing.assert_allclose(np.concatenate([head, tail], axis=1), full, atol=1e-10)


@pytest.mark.parametrize("chunks", [(3, 5), (1, 6, 1), (2, 2, 2, 2)])
def test_a_prompt_fed_in_chunks_through_the_cache_gives_the_full_forward(float64, chunks):
    """GPT.forward on chunks of a prompt one after another with one cache (each chunk's queries
    attend causally over the cache the earlier chunks filled) = model(all) at every position."""
    model = tiny()
    ids = np.random.default_rng(4).integers(0, TINY["vocab_size"], (2, sum(chunks)))
    full = host(model(ids)[0])                                               # (B, T, V)
    cache = G.KVCache(model.config, batch_size=2)
    pieces, start = [], 0
    with sl.no_grad():
        for size in chunks:
            pieces.append(host(model(ids[:, start:start + size], cache=cache)[0]))
            start += size
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("prompt_len", [1, 4, 7, 8, 11])
@pytest.mark.parametrize("controls", [dict(temperature=0), dict(temperature=1.0, seed=3),
                                      dict(temperature=0.7, top_k=4, top_p=0.9, seed=5),
                                      dict(temperature=1.0, repetition_penalty=1.5, seed=2)])
def test_cache_gives_the_same_tokens_as_no_cache(prompt_len, controls):
    """Greedy and sampled, prompts shorter than, equal to and longer than the window, float32."""
    model = tiny(seed=1)
    prompt = np.random.default_rng(prompt_len).integers(0, 13, (2, prompt_len))
    cached = host(model.generate(prompt, 20, **controls))
    uncached = host(model.generate(prompt, 20, use_cache=False, **controls))
    assert cached.shape == (2, prompt_len + 20)
    np.testing.assert_array_equal(cached, uncached)
    np.testing.assert_array_equal(cached[:, :prompt_len], prompt)


@pytest.mark.parametrize("keep", [None, 1, 4, 7, 8])
def test_sliding_window_beyond_block_size_matches_the_naive_loop(keep):
    """30 new tokens with block_size 8: the window slides many times, cached or not, and both
    equal the naive full-window loop with the documented rule."""
    model = tiny(seed=2)
    prompt = [[1, 2, 3], [7, 7, 7]]
    expected = naive_greedy(model, prompt, 30, keep)
    cached = host(model.generate(prompt, 30, temperature=0, window_keep=keep))
    uncached = host(model.generate(prompt, 30, temperature=0, window_keep=keep, use_cache=False))
    np.testing.assert_array_equal(cached, expected)
    np.testing.assert_array_equal(uncached, expected)


def test_sliding_window_with_sampling_matches_no_cache():
    model = tiny(seed=3)
    for keep in (None, 5):
        a = host(model.generate([[4]], 40, temperature=1.0, top_k=6, seed=11, window_keep=keep))
        b = host(model.generate([[4]], 40, temperature=1.0, top_k=6, seed=11, window_keep=keep, use_cache=False))
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("overrides", [{}, dict(positional="sinusoidal", bias=False)])
def test_row_decoder_step_equals_the_full_forward_of_each_row(any_backend, overrides):
    """One RowDecoder step over rows at different positions (each row's earlier positions in its
    own slot) gives, for every row, the logits of the full forward over that row's sequence."""
    model = tiny(seed=4, **overrides)
    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, 13, n) for n in (1, 5, 8, 3)]
    rows = G.RowDecoder(model, rows=5)                        # one slot more than the step uses
    for slot, ids in enumerate(sequences):
        if len(ids) > 1:
            alone = G.KVCache(model.config)
            G.prefill(model, ids[None, :-1], alone)
            rows.cache.copy_row(alone, 0, slot, alone.length)
    got = rows.step([ids[-1] for ids in sequences], [len(ids) - 1 for ids in sequences])    # (B, V)
    for b, ids in enumerate(sequences):
        full, _ = model(ids[None])
        np.testing.assert_allclose(got[b], host(full)[0, -1], rtol=0, atol=1e-10)


def test_row_decoder_prefill_equals_the_full_forward_and_fills_the_slot(any_backend):
    """A prompt prefilled into slot 2 gives the full forward's last logits, and then a step
    from that slot continues it as the full forward over the longer sequence does."""
    model = tiny(seed=6)
    ids = np.random.default_rng(3).integers(0, 13, 7)
    rows = G.RowDecoder(model, rows=3)
    full, _ = model(ids[None])
    np.testing.assert_allclose(rows.prefill(ids[:6], 2), host(full)[0, 5], rtol=0, atol=1e-10)
    rows.cache.copy_row(rows.cache, 2, 0, 6)                 # the slot moves to row 0, as a retiring row's does
    np.testing.assert_allclose(rows.step([ids[6]], [6])[0], host(full)[0, 6], rtol=0, atol=1e-10)


@pytest.mark.parametrize("controls", [dict(temperature=0), dict(temperature=1.0, seed=3),
                                      dict(temperature=0.8, top_k=5, top_p=0.9, seed=7),
                                      dict(temperature=1.0, repetition_penalty=1.3, seed=1)])
def test_several_prompts_batched_equal_each_prompt_alone(controls):
    """generate() over 3 prompts = each prompt alone, row b with seed + b (greedy and sampled),
    through window slides (block_size 8, 14 new tokens)."""
    model = tiny(seed=5)
    prompts = np.random.default_rng(2).integers(0, 13, (3, 4))
    seed = controls.pop("seed", 0)
    batched = host(model.generate(prompts, 14, seed=seed, **controls))
    for b in range(3):
        alone = host(model.generate(prompts[b:b + 1], 14, seed=seed + b, **controls))
        np.testing.assert_array_equal(batched[b:b + 1], alone)
    if controls["temperature"]:                                         # rows really draw apart
        same = host(model.generate(np.repeat(prompts[:1], 3, axis=0), 14, seed=seed, **controls))
        assert len({tuple(row) for row in same}) > 1


def test_small_decode_steps_run_on_one_blas_thread():
    """The context a small step runs in caps the BLAS pool at one thread (and restores it)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():          # NumPy's BLAS, the one a NumPy decode step calls (torch may load another)
        return [pool["num_threads"] for pool in threadpoolctl.threadpool_info()
                if pool["user_api"] == "blas" and "numpy" in pool["filepath"]]
    before = blas_threads()
    if not before:
        pytest.skip("no NumPy BLAS library that threadpoolctl can see")
    with G.blas_threads_for(rows=1, channels=64):
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before
    assert isinstance(G.blas_threads_for(rows=64, channels=4096), type(contextlib.nullcontext()))


def test_cache_refuses_overflow_and_gradients():
    model = tiny()
    cache = G.KVCache(model.config)
    G.prefill(model, np.arange(8)[None] % 13, cache)
    with pytest.raises(UserError, match="block_size"):
        G.decode_step(model, np.array([1]), cache)
    layer = G.LayerKVCache(1, 2, 4, 8)
    k = sl.tensor(np.zeros((1, 2, 1, 8)), requires_grad=True)
    with pytest.raises(RuntimeError, match="no_grad"):
        layer.append(k, k)


def test_generate_restores_training_mode_when_a_stream_is_closed_early():
    model = tiny(dropout=0.1)
    model.train()
    tok = CharTokenizer([chr(ord("a") + i) for i in range(13)])
    stream = G.stream_text(model, tok, "abc", max_new_tokens=50, temperature=1.0)
    next(stream)
    assert not model.training
    stream.close()
    assert model.training and model.transformer.drop.training


# ---------------------------------------------------------------------- sampling controls

def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny(seed=4)
    prompt = [[1, 2], [3, 4]]
    greedy = host(model.generate(prompt, 15, temperature=0))
    np.testing.assert_array_equal(greedy, naive_greedy(model, prompt, 15))
    np.testing.assert_array_equal(host(model.generate(prompt, 15, temperature=1.3, top_k=1, seed=9)), greedy)
    np.testing.assert_array_equal(host(model.generate(prompt, 15, temperature=1.3, top_p=1e-9, seed=9)), greedy)


def test_filters_on_a_hand_made_distribution():
    p = np.array([0.4, 0.3, 0.2, 0.1])
    rows = np.repeat(np.log(p)[None], 4000, axis=0)
    rng = np.random.default_rng(0)
    assert set(G.sample_next_token(rows, 1.0, None, 0.05, rng)) == {0}          # only the argmax survives
    assert set(G.sample_next_token(rows, 1.0, None, 0.65, rng)) == {0, 1}       # 0.4 < 0.65 <= 0.7
    assert set(G.sample_next_token(rows, 1.0, 3, None, rng)) == {0, 1, 2}
    assert set(G.sample_next_token(rows, 1.0, 3, 0.5, rng)) == {0, 1}           # top-k, then top-p of the rest
    assert set(G.sample_next_token(rows, 1.0, 0, None, rng)) == {0, 1, 2, 3}    # top_k 0 = off
    assert set(G.sample_next_token(rows, 0.0, None, None, rng)) == {0}          # temperature 0 = greedy
    # temperature before top-p: at T=0.5 the probabilities are p^2 / sum p^2 = (.53, .3, .13, .03),
    # so top_p=0.5 keeps one token; at T=1 the first token's 0.4 < 0.5 and it keeps two
    assert set(G.sample_next_token(rows, 0.5, None, 0.5, rng)) == {0}
    assert set(G.sample_next_token(rows, 1.0, None, 0.5, rng)) == {0, 1}


def test_repetition_penalty_on_crafted_logits():
    logits = np.array([[2.0, -2.0, 1.0, 0.5]])
    context = np.array([[0, 1, 1]])                          # tokens 0 and 1 were seen (1 twice: counts once)
    out = G.apply_repetition_penalty(logits, context, 2.0)
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, 0.5]])
    assert G.apply_repetition_penalty(logits, context, 1.0) is logits
    rng = np.random.default_rng(0)
    assert G.sample_next_token(logits, 0, None, None, rng)[0] == 0                # 2.0 wins unpenalised
    assert G.sample_next_token(G.apply_repetition_penalty(logits, context, 4.0), 0, None, None, rng)[0] == 2


def test_repetition_penalty_lowers_repeats_in_generated_text():
    model = tiny(seed=5, vocab_size=13, block_size=32)

    def repeats(penalty):
        total = 0
        for seed in range(6):
            out = host(model.generate([[0]], 12, temperature=1.0, seed=seed, repetition_penalty=penalty))[0]
            total += len(out) - len(set(out.tolist()))               # tokens that occurred before
        return total
    assert repeats(5.0) < repeats(1.0)


@pytest.mark.parametrize("bad, needle", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=True), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(seed=-1), "seed"), (dict(window_keep=0), "window_keep"), (dict(window_keep=9), "window_keep"),
    (dict(stop=""), "stop"), (dict(stop=["ok", 3]), "stop"),
])
def test_bad_controls_are_refused_up_front(bad, needle):
    model = tiny()
    tok = CharTokenizer([chr(ord("a") + i) for i in range(13)])
    controls = {"max_new_tokens": 3, **bad}
    with pytest.raises(ValueError, match=needle):
        G.stream_text(model, tok, "ab", **controls)               # raised at the call, before iterating
    if "stop" not in bad:
        with pytest.raises(UserError, match=needle):
            model.generate([[1]], **controls)


def test_prompts_are_checked():
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        tiny().generate([[13]], 2)
    with pytest.raises(ValueError, match="at least one token"):
        tiny().generate(np.zeros((1, 0), dtype=np.int64), 2)


# ---------------------------------------------------------------------- stop strings and streaming

ALPHABET = list("ab \n.xyz")


def char_model(seed=0, block_size=16):
    tok = CharTokenizer(ALPHABET)
    return GPT(GPTConfig(vocab_size=len(ALPHABET), block_size=block_size, n_layer=1, n_head=2, n_embd=16),
               seed=seed), tok


def test_stop_string_ends_the_text_before_it():
    model, tok = char_model(seed=1)
    full = G.generate_text(model, tok, "ab", max_new_tokens=40, temperature=1.0, seed=3)
    assert len(full) == 40
    stop = full[17:20]
    first = full.find(stop)
    pieces = list(G.stream_text(model, tok, "ab", max_new_tokens=40, temperature=1.0, seed=3, stop=stop))
    assert "".join(pieces) == full[:first]
    assert all(pieces)
    # several stop strings: the earliest occurrence wins; a stop string that never occurs changes nothing
    other = full[5:7]
    assert G.generate_text(model, tok, "ab", max_new_tokens=40, temperature=1.0, seed=3,
                           stop=[stop, other]) == cut_at_first_stop(full, [stop, other])
    assert G.generate_text(model, tok, "ab", max_new_tokens=40, temperature=1.0, seed=3,
                           stop="zzzzzzzzzzzz") == full


def cut_at_first_stop(text, stops):
    """The oracle: grow the text one character at a time; the first time it contains a stop
    string, cut where that stop string begins (two completing at once: the earlier start)."""
    for end in range(1, len(text) + 1):
        found = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if found:
            return text[:min(found)]
    return text


def fake_steps(ids):
    """A stand-in for iter_tokens: yields the given ids one at a time, as (1,) arrays."""
    for i in ids:
        yield np.array([i])


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet="ab\n. ", max_size=40), st.text(alphabet="ab\n. ", min_size=1, max_size=4),
       st.text(alphabet="ab\n. ", min_size=1, max_size=3))
def test_stop_strings_on_any_text(text, stop, other):
    """Streamed pieces joined = the text up to the first moment it contains a stop string, cut
    where that stop string begins (if two complete at once, the earlier start); no empty piece."""
    tok = CharTokenizer(list("ab\n. "))
    pieces = list(G._text_pieces(fake_steps(tok.encode(text)), G._TextPieces(tok), [stop, other]))
    assert "".join(pieces) == cut_at_first_stop(text, [stop, other])
    assert all(pieces)


@pytest.fixture(scope="module")
def unicode_bpe():
    text = "héllo wörld 你好世界 🙂🙃 naïve café " * 8 + "ünïcödé 日本語 ✓✗ ∑∫"
    return ByteLevelBPE.train(text, vocab_size=300, special_tokens=())


@st.composite
def byte_level_tokenizations(draw, tokenizer):
    """Random text over multi-byte characters, cut into random vocabulary tokens: single bytes
    (which split characters) and merged tokens wherever their bytes match."""
    text = draw(st.text(alphabet="aé你🙂 ö∑\n", max_size=25))
    data = text.encode("utf-8")
    by_first_byte = {}
    for token_id, token in enumerate(tokenizer.token_bytes):
        by_first_byte.setdefault(token[0], []).append((token_id, token))
    ids, i = [], 0
    while i < len(data):
        choices = [(t, b) for t, b in by_first_byte[data[i]] if data.startswith(b, i)]
        token_id, token = draw(st.sampled_from(choices))
        ids.append(token_id)
        i += len(token)
    return text, ids


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_streaming_never_splits_a_character(unicode_bpe, data):
    text, ids = data.draw(byte_level_tokenizations(unicode_bpe))
    assert unicode_bpe.decode_bytes(ids) == text.encode("utf-8")
    pieces = list(G._text_pieces(fake_steps(ids), G._TextPieces(unicode_bpe), []))
    assert "".join(pieces) == text
    for piece in pieces:
        assert piece and "\ufffd" not in piece          # whole characters only, never a replacement
        piece.encode("utf-8")                           # and no lone surrogate


def test_stream_text_of_a_bpe_model_equals_decoding_its_ids(unicode_bpe):
    """End to end, with whatever bytes a random model emits (invalid UTF-8 included): the stream
    joined equals decoding all its ids at once (errors -> U+FFFD in both)."""
    model = GPT(GPTConfig(vocab_size=unicode_bpe.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16), seed=6)
    prompt = unicode_bpe.encode("café ")
    for seed in range(3):
        ids = host(model.generate([prompt], 40, temperature=1.0, seed=seed))[0, len(prompt):]
        pieces = list(G.stream_text(model, unicode_bpe, prompt, max_new_tokens=40, temperature=1.0, seed=seed))
        assert "".join(pieces) == unicode_bpe.decode(ids.tolist())


def test_empty_prompt_starts_from_a_newline():
    model, tok = char_model()
    assert G.encode_prompt(tok, "") == tok.encode("\n")
    assert G.encode_prompt(CharTokenizer(list("ab")), "") == [0]
    assert G.generate_text(model, tok, "", max_new_tokens=5, temperature=0) == \
        G.generate_text(model, tok, "\n", max_new_tokens=5, temperature=0)


def test_held_back_is_the_longest_suffix_that_starts_a_stop_string():
    assert G._held_back("abc\n", ["\n\n"]) == 1
    assert G._held_back("abc", ["\n\n"]) == 0
    assert G._held_back("xxab", ["abc", "b!"]) == 2
    assert G._held_back("ab", ["ab"]) == 0          # only proper prefixes: a whole stop string is found, not held


def test_cupy_cache_matches_numpy():
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception:
        pytest.skip("no CUDA device")
    model = tiny(seed=7)
    expected = host(model.generate([[1, 2, 3]], 20, temperature=0.9, top_k=5, seed=1))
    previous = backend.get_backend()
    sl.use_backend("cupy")
    try:
        gpu_model = tiny(seed=7)
        cached = host(gpu_model.generate([[1, 2, 3]], 20, temperature=0.9, top_k=5, seed=1))
        uncached = host(gpu_model.generate([[1, 2, 3]], 20, temperature=0.9, top_k=5, seed=1, use_cache=False))
    finally:
        sl.use_backend(previous)
    np.testing.assert_array_equal(cached, uncached)
    np.testing.assert_array_equal(cached, expected)


def test_ctrl_c_stops_a_stream_between_pieces_and_restores_everything():
    import os
    import signal
    model, tok = char_model(seed=2)
    model.train()
    before = signal.getsignal(signal.SIGINT)
    shown = []
    with pytest.raises(KeyboardInterrupt):
        for piece in G.until_interrupted(G.stream_text(model, tok, "ab", max_new_tokens=500, temperature=1.0)):
            shown.append(piece)
            if len(shown) == 3:
                os.kill(os.getpid(), signal.SIGINT)       # as if Ctrl-C were pressed now
    assert len(shown) == 3                                # no piece after the interrupt
    assert model.training                                 # the stream was closed: mode restored
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------------- word-level documents (coco)

def word_model():
    from scratchlm.tokenizers.word import WordTokenizer
    tok = WordTokenizer.from_text(["a man rides a horse on a beach.", "a cat sleeps on a bed, next to a laptop."],
                                  min_count=1)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16), seed=3), tok


def test_word_prompts_start_documents_at_the_boundary():
    """A word tokenizer drops whitespace, so a newline cannot be its own token: each newline of a
    prompt becomes the boundary that frames sentences (<pad>, as scratchlm.tasks), and an empty
    prompt is the boundary alone -- the first input of every training sentence."""
    _, tok = word_model()
    a, man = tok.encode("a man")
    assert G.encode_prompt(tok, "") == [tok.pad_id]
    assert G.encode_prompt(tok, "\n") == [tok.pad_id]
    assert G.encode_prompt(tok, "\na man") == [tok.pad_id, a, man]
    assert G.encode_prompt(tok, "a\nman") == [a, tok.pad_id, man]
    assert G.encode_prompt(tok, "a man") == [a, man]


def test_word_stream_reads_as_decoded_text_and_stops_at_the_boundary():
    """The stream joined equals the word tokenizer's decoding of the same ids (spaces between words,
    closing punctuation glued), after the prompt's words, and ends where the model writes the boundary."""
    model, tok = word_model()
    ended = 0
    for prompt in ("", "\na man"):
        ids = G.encode_prompt(tok, prompt)
        for seed in range(6):
            new = host(model.generate([ids], 40, temperature=1.0, seed=seed))[0, len(ids):].tolist()
            cut = new.index(tok.pad_id) if tok.pad_id in new else len(new)
            ended += cut < len(new)
            text = "".join(G.stream_text(model, tok, ids, max_new_tokens=40, temperature=1.0, seed=seed, stop="\n"))
            head = tok.decode(ids)
            assert head + text == tok.decode(ids + new[:cut])
            assert "\n" not in text
    assert ended > 0                                    # the boundary was met, so the stop was exercised


def test_word_pieces_glue_punctuation_like_decode():
    _, tok = word_model()
    ids = tok.encode("a man rides a horse on a beach, a cat sleeps.")
    pieces = list(G._text_pieces(fake_steps(ids), G._TextPieces(tok), []))
    assert "".join(pieces) == tok.decode(ids)
    assert pieces[1] == " man" and "," in pieces and "." in pieces
