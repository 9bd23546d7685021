"""scratchlm.kernels.decode: the fused Numba decode step against its NumPy reference.

Oracles: the reference step (``kernels.decode.step_reference``, the path ``RowDecoder`` runs
without Numba) on the same float32 weights and the same cache, compared logit by logit and on the
keys and values the step writes; the model's own full forward (no cache) for greedy generation.
Random weights, rows at different positions (0 and the last one of the window included), learned
and sinusoidal positions, with and without biases, 1 and 2 threads, and more claimants than threads.
"""
import numpy as np
import pytest

import scratchlm as sl
from scratchlm import generate as G
from scratchlm.kernels import decode, force_rung
from scratchlm.models import GPT, GPTConfig
from scratchlm.rowdecode import RowDecoder

numba = pytest.importorskip("numba")

SMALL = dict(vocab_size=37, block_size=24, n_layer=2, n_head=4, n_embd=32)
VARIANTS = [dict(), dict(positional="sinusoidal", bias=False)]


@pytest.fixture(autouse=True)
def float32():
    previous = sl.backend.get_default_dtype()
    sl.set_default_dtype(np.float32)
    yield
    sl.set_default_dtype(previous)


def small(seed=0, **overrides):
    model = GPT(GPTConfig(**{**SMALL, **overrides}), seed=seed).eval()
    assert model.transformer.wte.weight.dtype == np.float32
    return model


def filled(model, rows, lengths, seed):
    """A RowDecoder whose slot b holds a random sequence of lengths[b] tokens (prefilled by the
    reference), and the token each row feeds next."""
    rng = np.random.default_rng(seed)
    decoder = RowDecoder(model, rows)
    with force_rung("decode", "reference"):
        for slot, length in enumerate(lengths):
            if length:
                decoder.prefill(rng.integers(0, SMALL["vocab_size"], length), slot)
    return decoder, rng.integers(0, SMALL["vocab_size"], len(lengths))


def assert_close(kernel, reference):
    """float32 sums in another order: |a - b| <= 1e-5 (1 + max|b|) per entry (the logits are O(1))."""
    np.testing.assert_allclose(kernel, reference, rtol=0, atol=1e-5 * (1 + np.abs(reference).max()))


def step_both(model, lengths, seed, threads):
    """Logits and the written cache entries of one step, from the reference (``RowDecoder.step``)
    and from the kernel on ``threads`` claimants (a step this small would take one by default)."""
    results = []
    for rung in ("reference", "numba"):
        decoder, tokens = filled(model, len(lengths) + 1, lengths, seed)          # one slot more than used
        if rung == "reference":
            with force_rung("decode", rung):
                logits = decoder.step(tokens, lengths)
        else:
            logits = decode.step_numba(decoder.weights, decoder.keys, decoder.values, tokens,
                                       np.asarray(lengths), np.arange(len(lengths)), decoder.scratch,
                                       threads=threads).astype(np.float64)
        written = [(layer.keys[b, :, t].copy(), layer.values[b, :, t].copy())
                   for layer in decoder.cache.layers for b, t in enumerate(lengths)]
        results.append((logits, written))
    return results


def spread(rows):
    """Positions of ``rows`` rows spread over the window (0 and the last one included)."""
    return [(b * 7) % SMALL["block_size"] if b % 5 else SMALL["block_size"] - 1 - b % 3 for b in range(rows)]


@pytest.mark.parametrize("overrides", VARIANTS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lengths", [[0], [9], [23], [4, 17], [5, 0, 23, 11], [3, 3, 3, 3, 3, 3, 3, 3],
                                     [5, 0, 23, 11, 2], spread(16), spread(32)], ids=lambda v: f"B={len(v)}")
def test_kernel_step_equals_the_reference_step(overrides, threads, lengths):
    """Rows at their own positions (B = 1..32: the blocks of four rows and the rows left over): the
    same logits and the same keys and values written."""
    (ref_logits, ref_written), (logits, written) = step_both(small(seed=1, **overrides), lengths, 7, threads)
    assert_close(logits, ref_logits)
    for (k, v), (ref_k, ref_v) in zip(written, ref_written):
        assert_close(k, ref_k)
        assert_close(v, ref_v)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_kernel_prefill_equals_the_reference_prefill(overrides):
    """A prompt of T <= KERNEL_MAX_ROWS positions as rows sharing one slot: the same last logits
    and the same keys and values in the slot."""
    model = small(seed=2, **overrides)
    prompt = np.random.default_rng(3).integers(0, SMALL["vocab_size"], SMALL["block_size"])
    results = []
    for rung in ("reference", "numba"):
        decoder = RowDecoder(model, 2)
        with force_rung("decode", rung):
            logits = decoder.prefill(prompt, 1)
        results.append((logits, [layer.keys[1].copy() for layer in decoder.cache.layers]))
    assert_close(results[1][0], results[0][0])
    for keys, ref_keys in zip(results[1][1], results[0][1]):
        assert_close(keys, ref_keys)


def test_a_row_gets_the_same_bits_alone_or_in_a_batch():
    """The kernel's products sum each row in one order whatever B and the row's place in a block of
    four (on one thread): a 13-row step gives each row exactly the logits of its 1-row step."""
    model = small(seed=11)
    lengths = spread(13)
    decoder, tokens = filled(model, 13, lengths, 12)
    together = decode.step_numba(decoder.weights, decoder.keys, decoder.values, tokens, np.asarray(lengths),
                                 np.arange(13), decoder.scratch, threads=1).copy()
    for b in range(13):
        alone = decode.step_numba(decoder.weights, decoder.keys, decoder.values, tokens[b:b + 1],
                                  np.asarray(lengths[b:b + 1]), np.array([b]), decoder.scratch, threads=1)
        np.testing.assert_array_equal(alone[0], together[b])


PROMPT_LENGTHS, PROMPT_SLOTS = [7, 1, 23, 12, 3], [2, 0, 4, 1, 3]


def prompts_of(seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, SMALL["vocab_size"], n) for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("overrides", VARIANTS)
@pytest.mark.parametrize("chunk", [5, 32])
@pytest.mark.parametrize("rung", ["reference", "numba"])
def test_prefill_rows_equals_separate_prefills(overrides, chunk, rung, monkeypatch):
    """Five prompts (1 to 23 tokens) into five slots in one forward, in chunks that end one prompt and
    start the next: each prompt's logits and its slot's keys and values equal those of its own prefill."""
    import scratchlm.rowdecode as rowdecode
    monkeypatch.setattr(rowdecode, "PREFILL_CHUNK", chunk)
    model = small(seed=13, **overrides)
    prompts = prompts_of(14)
    together, alone = RowDecoder(model, 5), RowDecoder(model, 5)
    with force_rung("decode", rung):
        logits = together.prefill_rows(prompts, PROMPT_SLOTS)
        for n, (prompt, slot) in enumerate(zip(prompts, PROMPT_SLOTS)):
            assert_close(logits[n], alone.prefill(prompt, slot))
    for mine, theirs in zip(together.cache.layers, alone.cache.layers):
        for slot, length in zip(PROMPT_SLOTS, PROMPT_LENGTHS):
            assert_close(mine.keys[slot, :, :length], theirs.keys[slot, :, :length])
            assert_close(mine.values[slot, :, :length], theirs.values[slot, :, :length])


@pytest.mark.parametrize("rung", ["reference", "numba"])
def test_prefill_rows_gives_the_full_forward(rung, monkeypatch):
    """Each prompt's logits from a joint prefill (chunks of 5) equal the model's full forward over
    that prompt alone (no cache): no prompt sees another's positions."""
    import scratchlm.rowdecode as rowdecode
    monkeypatch.setattr(rowdecode, "PREFILL_CHUNK", 5)
    model = small(seed=15)
    prompts = prompts_of(16)
    with force_rung("decode", rung):
        logits = RowDecoder(model, 5).prefill_rows(prompts, PROMPT_SLOTS)
    for ours, prompt in zip(logits, prompts):
        full = sl.backend.to_numpy(G._forward_window(model, prompt[None]))[0]
        assert_close(ours, full.astype(np.float64))


def test_prefill_rows_refuses_an_empty_prompt():
    with pytest.raises(ValueError, match="non-empty"):
        RowDecoder(small(seed=0), 2).prefill_rows([[1, 2], []], [0, 1])


@pytest.mark.parametrize("rung", ["reference", "numba"])
def test_a_prefill_in_chunks_gives_the_full_forward(rung, monkeypatch):
    """A 23-token prompt prefilled 5 positions at a time (chunks attending over the slot the earlier
    chunks filled): its next-token logits, and those of a step after it, equal the model's full
    forward over the prompt (no cache, one causal attention over all positions)."""
    import scratchlm.rowdecode as rowdecode
    monkeypatch.setattr(rowdecode, "PREFILL_CHUNK", 5)
    model = small(seed=9)
    prompt = np.random.default_rng(10).integers(0, SMALL["vocab_size"], 24)
    decoder = RowDecoder(model, 2)
    with force_rung("decode", rung):
        logits = decoder.prefill(prompt[:23], 1)
        after = decoder.step([0, prompt[23]], [0, 23])[1]          # row 1 (slot 1) continues at 23
    for ours, length in ((logits, 23), (after, 24)):
        full = sl.backend.to_numpy(G._forward_window(model, prompt[None, :length]))[0]
        assert_close(ours, full.astype(np.float64))


def test_more_claimants_than_running_threads_still_give_the_step():
    """Two claimants on one Numba thread run one after the other: the first takes every share and
    the second finds none left; no claimant waits for one that has not started."""
    model = small(seed=4)
    lengths = [4, 17]
    (ref_logits, _), _ = step_both(model, lengths, 5, 1)
    decoder, tokens = filled(model, 2, lengths, 5)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        logits = decode.step_numba(decoder.weights, decoder.keys, decoder.values, np.asarray(tokens),
                                   np.asarray(lengths), np.arange(2), decoder.scratch, threads=2)
    finally:
        numba.set_num_threads(before)
    assert_close(logits, ref_logits)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_greedy_generation_through_the_kernel_equals_the_full_forward(overrides):
    """generate() with the cache (kernel steps, kernel prefills of the window after it slides) gives
    the tokens of the full forward per token, for 2 prompts decoded together."""
    model = small(seed=6, **overrides)
    prompts = np.random.default_rng(8).integers(0, SMALL["vocab_size"], (2, 10))
    with force_rung("decode", "numba"):
        cached = model.generate(prompts, 30, temperature=0)
    full = model.generate(prompts, 30, temperature=0, use_cache=False)
    np.testing.assert_array_equal(sl.backend.to_numpy(cached), sl.backend.to_numpy(full))


def test_the_reference_runs_where_the_kernel_does_not_apply():
    """float64 weights, more rows than KERNEL_MAX_ROWS, and a forced reference take the NumPy path."""
    decoder = RowDecoder(small(seed=0), 2)
    assert decode.uses_kernel(decoder.scratch, 2)
    assert not decode.uses_kernel(decoder.scratch, decode.KERNEL_MAX_ROWS + 1)
    with force_rung("decode", "reference"):
        assert not decode.uses_kernel(decoder.scratch, 2)
    sl.set_default_dtype(np.float64)
    assert not decode.uses_kernel(RowDecoder(GPT(GPTConfig(**SMALL), seed=0), 2).scratch, 2)


def test_the_address_table_refuses_an_array_it_cannot_view():
    """The kernel rebuilds each block array from its address: a non-contiguous one is refused."""
    decoder = RowDecoder(small(seed=0), 1)
    block = decoder.weights.blocks[0]
    strided = np.asfortranarray(block.attn_weight)
    weights = decoder.weights._replace(blocks=(block._replace(attn_weight=strided),) + decoder.weights.blocks[1:])
    with pytest.raises(ValueError, match="C-contiguous"):
        decoder.scratch.kernel.bind(weights, decoder.keys, decoder.values)


def test_generate_module_still_exports_the_row_decoder():
    assert G.RowDecoder is RowDecoder
