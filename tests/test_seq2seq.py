"""Seq2SeqTransformer, label smoothing, decoding (greedy, beam, cache) and the pair data.

Oracles: a NumPy formula and torch's ``cross_entropy(label_smoothing=)`` for the loss, finite
differences for its gradient, the PyTorch twin of bench/seq2seq.py with our weights for the whole
model, padding invariance, decoding without the cache, and a brute-force search over every
sequence of a tiny vocabulary for beam search.
"""
import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest

import scratchlm as sl
from scratchlm import backend
from scratchlm.models.seq2seq import (BOS, EOS, PAD, Seq2SeqConfig, Seq2SeqTransformer,
                                      label_smoothed_cross_entropy)
from scratchlm.pairs import DATE_FORMS, MONTHS, PairTask, load_pairs, make_generated, ordinal
from scratchlm.tokenizers import load as load_tokenizer
from scratchlm.tokenizers.pairs import PairVocab
from scratchlm import translate
from scratchlm.translate import beam_search, decode, greedy_search, length_penalty

from gradcheck import check_gradients

ROOT = Path(__file__).resolve().parents[1]


def tiny(vocab=11, **kw):
    seed = kw.pop("seed", 0)
    options = dict(vocab_size=vocab, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=2,
                   dim_feedforward=32, max_len=12, dropout=0.0)
    options.update(kw)
    model = Seq2SeqTransformer(Seq2SeqConfig(**options), seed=seed)
    model.eval()
    return model


def random_batch(rng, B=3, S=5, T=4, V=11):
    src = rng.integers(4, V, size=(B, S))
    tgt_out = rng.integers(4, V, size=(B, T))
    tgt_out[2, 1], tgt_out[2, 2:] = EOS, PAD                 # a short target row, padded
    tgt_in = np.concatenate([np.full((B, 1), BOS), tgt_out[:, :-1]], axis=1)
    tgt_in[2, 2:] = PAD
    src[1, 3:] = PAD                                        # a padded source row
    return src, tgt_in, tgt_out


# ================================================================ label smoothing

def numpy_label_smoothing(z, t, eps, ignore=-100):
    """-(1/n) sum_rows sum_v q_v log p_v, q = (1 - eps) onehot + eps / V."""
    z = z.reshape(-1, z.shape[-1]).astype(np.float64)
    t = t.reshape(-1)
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    keep = t != ignore
    q = np.full(log_p.shape, eps / z.shape[1])
    q[np.arange(len(t))[keep], t[keep]] += 1 - eps
    return -(q * log_p).sum(1)[keep].mean()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_numpy_and_torch(eps):
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 5, 7))
    t = rng.integers(0, 7, size=(2, 5))
    t[1, 3:] = -100
    got = label_smoothed_cross_entropy(sl.tensor(z, dtype=np.float64), t, eps).item()
    assert got == pytest.approx(numpy_label_smoothing(z, t, eps), rel=1e-10)
    torch = pytest.importorskip("torch")
    want = torch.nn.functional.cross_entropy(torch.tensor(z).reshape(-1, 7), torch.tensor(t).reshape(-1),
                                             ignore_index=-100, label_smoothing=eps).item()
    assert got == pytest.approx(want, rel=1e-10)


def test_label_smoothing_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    t = rng.integers(0, 6, size=(3, 4))
    t[0, 1] = -100
    check_gradients(lambda z: label_smoothed_cross_entropy(z, t, 0.2), rng.standard_normal((3, 4, 6)))


# ================================================================ the model

def test_model_matches_the_pytorch_twin_with_our_weights():
    torch = pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("bench_seq2seq", ROOT / "bench" / "seq2seq.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tiny(label_smoothing=0.1)
    twin = bench.torch_twin(model.config, seed=0)
    state = {"embed.weight": model.tgt_embed.weight.numpy()}
    for name, p in model.transformer.state_dict().items():
        value = backend.to_numpy(p.data if hasattr(p, "data") else p)
        state[f"transformer.{name}"] = value.T if value.ndim == 2 else value
    twin.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)
    twin.eval()
    src, tgt_in, tgt_out = random_batch(np.random.default_rng(3))
    logits, loss = model(src, tgt_in, tgt_out)
    with torch.no_grad():
        memory, pad = twin.encode(torch.tensor(src))
        want_logits = twin.decode(torch.tensor(tgt_in), memory, pad)
        want_loss = twin(torch.tensor(src), torch.tensor(tgt_in), torch.tensor(tgt_out))
    real = tgt_in != PAD
    np.testing.assert_allclose(logits.numpy()[real], want_logits.numpy()[real], rtol=1e-4, atol=1e-4)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)


def test_padding_does_not_change_logits_or_loss():
    model = tiny()
    src, tgt_in, tgt_out = random_batch(np.random.default_rng(4))
    logits, loss = model(src, tgt_in, tgt_out)
    wide = lambda a, n: np.concatenate([a, np.full((a.shape[0], n), PAD)], axis=1)
    logits2, loss2 = model(wide(src, 3), wide(tgt_in, 2), wide(tgt_out, 2))
    real = tgt_in != PAD
    np.testing.assert_allclose(logits2.numpy()[:, :tgt_in.shape[1]][real], logits.numpy()[real], rtol=1e-5, atol=1e-5)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-5)


def test_shared_and_separate_vocabularies_and_learned_positions():
    shared = tiny()
    assert shared.src_embed is shared.tgt_embed and shared.head.weight is shared.tgt_embed.weight
    separate = tiny(src_vocab_size=20, positional="learned")
    assert separate.src_embed.weight.shape == (20, 16) and separate.head.weight is separate.tgt_embed.weight
    logits, loss = separate([[15, 19, 2]], [[1, 5, 6]], [[5, 6, 2]])
    assert logits.shape == (1, 3, 11) and np.isfinite(loss.item())


def test_a_few_steps_learn_to_copy():
    """Training through the loss and AdamW brings the loss of a fixed batch down (a smoke check
    of the gradient path through the whole model)."""
    from scratchlm.optim import AdamW
    model = tiny()
    model.train()
    rng = np.random.default_rng(5)
    src = rng.integers(4, 11, size=(8, 4))
    tgt_in = np.concatenate([np.full((8, 1), BOS), src], axis=1)
    tgt_out = np.concatenate([src, np.full((8, 1), EOS)], axis=1)
    opt = AdamW(list(model.parameters()), lr=3e-3)
    first = None
    for _ in range(30):
        _, loss = model(src, tgt_in, tgt_out)
        first = first or loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.5 * first


# ================================================================ decoding

@pytest.fixture(scope="module")
def decoder_model():
    return tiny(seed=7)


def sources():
    return np.array([[5, 6, 7, 2], [4, 4, 2, 0], [9, 8, 7, 6]])


def test_cache_gives_the_same_tokens_as_recomputing(decoder_model):
    src = sources()
    assert greedy_search(decoder_model, src, max_len=9) == greedy_search(decoder_model, src, max_len=9, use_cache=False)
    with_cache = beam_search(decoder_model, src, beam=3, max_len=9, n_best=3)
    without = beam_search(decoder_model, src, beam=3, max_len=9, n_best=3, use_cache=False)
    assert [[t for t, _ in nb] for nb in with_cache] == [[t for t, _ in nb] for nb in without]
    for a, b in zip(with_cache, without):
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-5)


def test_cached_step_logits_equal_the_full_forward(decoder_model):
    from scratchlm.translate import DecoderCache
    src = sources()
    tgt = np.array([[1, 5, 6, 7], [1, 4, 9, 9], [1, 10, 4, 5]])
    full, _ = decoder_model(src, tgt)
    with sl.no_grad():
        memory, mask = decoder_model.encode(src)
        cache = DecoderCache(decoder_model, 3)
        steps = [decoder_model.decode(tgt[:, t:t + 1], memory, mask, cache=cache).numpy() for t in range(4)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_one_equals_greedy(decoder_model, alpha):
    src = sources()
    greedy = greedy_search(decoder_model, src, max_len=10)
    beam = [nb[0][0] for nb in beam_search(decoder_model, src, beam=1, alpha=alpha, max_len=10)]
    assert beam == greedy


def brute_force(model, src_row, max_len, alpha):
    """Every hypothesis (ending in </s> within max_len, or cut at max_len), scored as the search
    scores them: log P under the distribution with <pad> and <s> removed, over lp(|Y|)."""
    V = model.config.vocab_size
    words = [v for v in range(V) if v not in (PAD, BOS, EOS)]
    hyps = []
    for n in range(max_len + 1):
        for body in itertools.product(words, repeat=n):
            if n < max_len:
                hyps.append(list(body) + [EOS])
            if n == max_len:
                hyps.append(list(body))
    src = np.asarray([src_row] * len(hyps))
    width = max(len(h) for h in hyps)
    tgt_in = np.full((len(hyps), width), PAD)
    for i, h in enumerate(hyps):
        tgt_in[i, :len(h)] = [BOS] + h[:-1]
    logits, _ = model(src, tgt_in)
    z = logits.numpy().astype(np.float64)
    z[..., [PAD, BOS]] = -np.inf
    log_p = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    scored = []
    for i, h in enumerate(hyps):
        total = sum(log_p[i, t, tok] for t, tok in enumerate(h))
        scored.append((total / length_penalty(len(h), alpha), [t for t in h if t != EOS]))
    return sorted(scored, key=lambda s: -s[0])


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_as_wide_as_the_space_finds_the_best_sequence(alpha):
    model = tiny(vocab=6, seed=3)            # produced tokens: </s>, <unk>, 4, 5
    max_len = 3
    src = [4, 5, 5, EOS]
    best = brute_force(model, src, max_len, alpha)
    assert len(best) == 1 + 3 + 9 + 27
    found = beam_search(model, np.asarray([src]), beam=64, alpha=alpha, max_len=max_len, n_best=5)[0]
    assert [t for t, _ in found] == [t for _, t in best[:5]]
    np.testing.assert_allclose([s for _, s in found], [s for s, _ in best[:5]], rtol=1e-4)


def test_decode_batches_sorted_by_length_give_the_same_result(decoder_model):
    src = [[5, 6, 7, 2], [4, 2], [9, 8, 7, 6, 5, 2]]
    one_by_one = [greedy_search(decoder_model, np.asarray([s]))[0] for s in src]
    assert decode(decoder_model, src, beam=1, batch_size=2) == one_by_one


def test_bad_beam_and_max_len_are_user_errors(decoder_model):
    from scratchlm.errors import UserError
    with pytest.raises(UserError, match="beam size"):
        beam_search(decoder_model, sources(), beam=0)
    too_wide = translate.BEAM_STEP_BYTES // (8 * len(sources()) * decoder_model.config.vocab_size) + 1
    with pytest.raises(UserError, match="GiB a step"):                   # refused before any memory is taken
        beam_search(decoder_model, sources(), beam=too_wide)
    with pytest.raises(UserError, match="max_len"):
        greedy_search(decoder_model, sources(), max_len=99)


# ================================================================ data

def test_eng_fra_split_is_grouped_by_english_and_keeps_attribution():
    data = load_pairs("eng-fra")
    english = {s: {p.source for p in data.splits[s]} for s in ("train", "val", "test")}
    assert not english["train"] & english["val"] and not english["train"] & english["test"] \
        and not english["val"] & english["test"]
    assert sum(len(v) for v in data.splits.values()) == 5000
    assert all(p.attribution.startswith("CC-BY 2.0 (France)") for p in data.splits["test"])
    reverse = load_pairs("eng-fra", reverse=True)
    assert [(p.target, p.source) for p in reverse.splits["val"]] == [(p.source, p.target) for p in data.splits["val"]]
    sources, refs = data.references("test")
    assert len(sources) == len(english["test"]) and sum(map(len, refs)) == len(data.splits["test"])


@pytest.mark.parametrize("name", ["copy", "reverse", "dates"])
def test_generated_tasks_hold_out_their_test_targets(name):
    data = make_generated(name, seed=0, n_train=2000, n_eval=100)
    train = {p.target for p in data.splits["train"]}
    assert not train & {p.target for p in data.splits["test"]}
    assert make_generated(name, seed=0, n_train=2000, n_eval=100).splits == data.splits     # seeded
    for p in data.splits["test"]:
        if name == "copy":
            assert p.target == p.source and p.source.isdigit()
        elif name == "reverse":
            assert p.target == p.source[::-1]


def test_dates_are_normalised_correctly():
    import datetime
    data = make_generated("dates", seed=1, n_train=300, n_eval=50)
    for p in data.splits["train"] + data.splits["test"]:
        day = datetime.date.fromisoformat(p.target)
        assert p.source in {form(day) for form in DATE_FORMS}
    assert DATE_FORMS[0](datetime.date(2021, 3, 3)) == "3rd of March 2021"
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 111)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "111th"]
    assert MONTHS[2] == "March"


@pytest.mark.parametrize("level", ["char", "word"])
def test_pair_vocab_round_trips_and_marks_unknowns(tmp_path, level):
    texts = ["Je suis fatigué.", "Va !", "J'ai gagné !", "I'm tired."]
    vocab = PairVocab.from_texts(texts, level)
    for t in texts:
        assert vocab.decode(vocab.encode(t)) == t
    vocab.save(tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert again.units == vocab.units and again.level == level
    assert again.encode("Je suis Zorro!").count(3) >= 1
    assert "Z" in "".join(again.unknown("Je suis Zorro!"))


def test_task_batches_frame_targets_and_count_tokens():
    data = make_generated("reverse", seed=0, n_train=50, n_eval=10)
    vocab = PairVocab.from_texts([p.source for p in data.splits["train"]], "char")
    task = PairTask(data, vocab)
    src, tgt_in, tgt_out = (backend.to_numpy(a) for a in task.batch("test", [0, 1]))
    for row in range(2):
        pair = data.splits["test"][row]
        n = len(pair.target)
        assert vocab.decode(src[row]) == pair.source and src[row][len(pair.source)] == EOS
        assert tgt_in[row, 0] == BOS and vocab.decode(tgt_in[row, 1:n + 1]) == pair.target
        assert vocab.decode(tgt_out[row, :n]) == pair.target and tgt_out[row, n] == EOS
    assert sum(n for _, n in task.whole_split("val", 4)) == task.tokens("val") == \
        sum(len(p.target) + 1 for p in data.splits["val"])
    a, b = task.sampler("train", 4, 0, seed=1), task.sampler("train", 4, 0, seed=1)
    np.testing.assert_array_equal(backend.to_numpy(a.batch(5)[0]), backend.to_numpy(b.batch(5)[0]))


def test_docstring_examples_run():
    import doctest

    import scratchlm.models.seq2seq
    import scratchlm.tokenizers.pairs
    for module in (scratchlm.models.seq2seq, scratchlm.tokenizers.pairs):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
