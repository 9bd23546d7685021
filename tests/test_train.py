"""The trainer: run-folder files, metrics, exact resume, NaN stop, checkpoint round trip, config parsing.

Every run here is tiny (1 layer, 16 channels, 16-token context, a few iterations) on a small text
written into tmp_path, so the whole file takes seconds.
"""
import importlib.util
import json
import math

import numpy as np
import pytest
from clitools import write_word_corpus

from scratchlm import backend
from scratchlm.errors import UserError
from scratchlm.config import TrainConfig, apply_overrides, load_preset, parse_overrides, preset_names
from scratchlm.runs import RUN_FILES, load_checkpoint, load_model, read_metrics
from scratchlm.train import TrainingDiverged, train

TIMING_KEYS = {"ms_per_iter", "tokens_per_s", "mfu"}


@pytest.fixture
def corpus_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    return write_word_corpus(tmp_path / "tiny.txt")


def tiny_config(**overrides) -> TrainConfig:
    values = dict(batch_size=4, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0,
                  learning_rate=3e-3, max_iters=6, lr_decay_iters=8, min_lr=3e-4, warmup_iters=2,
                  eval_interval=3, eval_iters=2, log_interval=1, seed=7)
    values.update(overrides)
    return TrainConfig.from_dict(values)


def without_timing(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


def test_training_writes_every_run_file_and_parsable_metrics(tmp_path, corpus_file):
    config = tiny_config()
    result = train(config, tmp_path / "run", corpus=str(corpus_file), progress=False)
    run = tmp_path / "run"
    for name in RUN_FILES + ("metrics.jsonl",):
        assert (run / name).is_file(), name
    # the loss curve is drawn exactly when matplotlib (the [plot] extra) is importable
    assert (run / "loss.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)
    assert result.iteration == config.max_iters

    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]           # every line is one JSON object
    train_lines = [m for m in records if m["kind"] == "train"]
    eval_lines = [m for m in records if m["kind"] == "eval"]
    assert [m["iter"] for m in train_lines] == list(range(config.max_iters))
    assert [m["iter"] for m in eval_lines] == [0, 3, 6]      # every eval_interval, and at the end
    for m in train_lines:
        assert math.isfinite(m["train_loss"]) and m["tokens_per_s"] > 0 and "mfu" in m
    for m in eval_lines:
        assert m["perplexity"] == pytest.approx(math.exp(m["val_loss"]))
    # the lr column follows nanoGPT's schedule: warmup (it + 1) / (warmup + 1), then cosine
    assert train_lines[0]["lr"] == pytest.approx(3e-3 * 1 / 3)
    assert train_lines[2]["lr"] == pytest.approx(3e-3)
    # a char model starts near ln(vocab) and the loss falls: every eval (the same fixed batches each
    # time, so a change is the model's, not the batches') below the one before, by 0.05 nats in all
    # (6 AdamW steps at lr <= 3e-3 move it by about 0.1 here; a model that never steps moves it by 0)
    vocab = json.loads((run / "config.json").read_text())["model_config"]["vocab_size"]
    assert eval_lines[0]["val_loss"] == pytest.approx(math.log(vocab), abs=0.3)
    val_losses = [m["val_loss"] for m in eval_lines]
    assert all(later < earlier for earlier, later in zip(val_losses, val_losses[1:])), val_losses
    assert val_losses[-1] < val_losses[0] - 0.05, val_losses
    state = json.loads((run / "trainer.json").read_text())
    assert state["iteration"] == config.max_iters
    assert state["best_val_loss"] == min(m["val_loss"] for m in eval_lines)


@pytest.fixture(autouse=True)
def numpy_backend_after():
    yield
    backend.use_backend("numpy")      # a cupy run must not leave the other tests on the GPU


def gpu_available() -> bool:
    try:
        backend.use_backend("cupy")
    except backend.BackendUnavailable:
        return False
    finally:
        backend.use_backend("numpy")
    return True


@pytest.mark.parametrize("split_at, backend_name", [(4, "numpy"), (3, "numpy"), (3, "cupy")])
def test_resume_continues_bit_identically(tmp_path, corpus_file, split_at, backend_name):
    """A resumed run against an uninterrupted one, with dropout and accumulation on (the per-step
    seeds matter). Both are the trainer, so a bug it repeats in both runs passes here: the resumed
    run is also checked against a loop written by hand in test_trainer_oracles.py."""
    if backend_name == "cupy" and not gpu_available():
        pytest.skip("no CuPy/GPU here")
    # dropout and gradient accumulation on, so the per-step randomness and the sampler both matter
    config = tiny_config(max_iters=8, eval_interval=4, dropout=0.1, gradient_accumulation_steps=2,
                         backend=backend_name)
    train(config, tmp_path / "whole", corpus=str(corpus_file), progress=False)

    first = apply_overrides(config, [f"max_iters={split_at}"])
    train(first, tmp_path / "split", corpus=str(corpus_file), progress=False)
    train(config, tmp_path / "split", resume=True, progress=False)

    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    losses = lambda ms: [(m["iter"], m["train_loss"]) for m in ms if m["kind"] == "train"]
    assert losses(split) == losses(whole)                    # exact float equality, every iteration
    if split_at % config.eval_interval == 0:                 # the same evals happened: every line equal
        assert without_timing(split) == without_timing(whole)
    model_a, _, _ = load_model(tmp_path / "whole")
    model_b, _, _ = load_model(tmp_path / "split")
    for key, value in model_a.state_dict().items():
        np.testing.assert_array_equal(backend.to_numpy(value), backend.to_numpy(model_b.state_dict()[key]), err_msg=key)


def test_nan_loss_stops_and_names_the_iteration(tmp_path, corpus_file, monkeypatch):
    from scratchlm.models import GPT
    original = GPT.forward
    calls = {"train": 0}

    def forward_that_blows_up(self, idx, targets=None):
        logits, loss = original(self, idx, targets)
        if self.training and targets is not None:
            calls["train"] += 1
            if calls["train"] == 5:                   # the training forward of iteration 4
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward_that_blows_up)
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_config(max_iters=10, eval_interval=3), tmp_path / "run", corpus=str(corpus_file), progress=False)
    message = str(info.value)
    assert "iteration 4" in message and "(iteration 3)" in message and str(tmp_path / "run") in message
    assert "\n" not in message
    # the diverged step was not saved: the folder still holds the good checkpoint
    assert json.loads((tmp_path / "run" / "trainer.json").read_text())["iteration"] == 3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_huge_learning_rate_diverges_with_a_user_error(tmp_path, corpus_file):
    with pytest.raises(UserError, match=r"at iteration \d+"):
        train(tiny_config(learning_rate=1e30, grad_clip=0.0, warmup_iters=0, max_iters=5), tmp_path / "run",
              corpus=str(corpus_file), progress=False)


def test_checkpoint_round_trip_restores_model_and_optimizer_exactly(tmp_path, corpus_file):
    from scratchlm.train import Trainer
    from scratchlm.data import load_corpus, prepare
    from scratchlm.tokenizers import load as load_tokenizer
    config = tiny_config(max_iters=3)
    train(config, tmp_path / "run", corpus=str(corpus_file), progress=False)

    tokenizer = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    prepared = prepare(load_corpus(str(corpus_file)), tokenizer)
    restored = Trainer(config, tokenizer, prepared, tmp_path / "run", resume=True, progress=False)
    saved_model, _ = __import__("scratchlm.checkpoint", fromlist=["x"]).load_safetensors(
        tmp_path / "run" / "model.safetensors")
    for key, value in restored.model.state_dict().items():
        np.testing.assert_array_equal(value, saved_model[key], err_msg=key)
    scalars, arrays = restored.optimizer.state_dict()
    saved_state = json.loads((tmp_path / "run" / "trainer.json").read_text())
    assert scalars == saved_state["optimizer"]
    assert all(s["step"] == 3 for s in scalars["state"].values())
    assert restored.iteration == 3


def test_checkpoint_with_files_of_different_iterations_is_refused(tmp_path, corpus_file):
    from scratchlm.optim import AdamW
    train(tiny_config(max_iters=3), tmp_path / "run", corpus=str(corpus_file), progress=False)
    state_path = tmp_path / "run" / "trainer.json"
    state = json.loads(state_path.read_text())
    state["iteration"] = 2                          # as if the save died between two files
    state_path.write_text(json.dumps(state))
    model, _, _ = load_model(tmp_path / "run")
    optimizer = AdamW(model.configure_optimizer_groups(0.1), lr=1e-3)
    with pytest.raises(UserError, match="different iterations"):
        load_checkpoint(tmp_path / "run", model, optimizer)


def test_fresh_run_refuses_to_overwrite_and_resume_refuses_new_architecture(tmp_path, corpus_file):
    train(tiny_config(max_iters=1), tmp_path / "run", corpus=str(corpus_file), progress=False)
    with pytest.raises(UserError, match="--resume"):
        train(tiny_config(max_iters=1), tmp_path / "run", corpus=str(corpus_file), progress=False)
    with pytest.raises(UserError, match="n_layer"):
        train(tiny_config(max_iters=2, n_layer=2), tmp_path / "run", resume=True, progress=False)


# ---------------------------------------------------------------- config parsing

def test_set_converts_to_each_field_type():
    config = apply_overrides(TrainConfig(), ["learning_rate=3e-4", "max_iters=2e3", "bias=false",
                                             "positional=sinusoidal", "n_layer=6"])
    assert config.learning_rate == 3e-4 and isinstance(config.learning_rate, float)
    assert config.max_iters == 2000 and isinstance(config.max_iters, int)
    assert config.bias is False and config.positional == "sinusoidal" and config.n_layer == 6


@pytest.mark.parametrize("pair, fragment", [
    ("lerning_rate=1e-3", "'lerning_rate' (did you mean 'learning_rate'?)"),
    ("zzz=1", "unknown config key 'zzz'"),
    ("max_iters=abc", "max_iters='abc' is not a valid int"),
    ("max_iters=2.5", "is not a valid int"),
    ("learning_rate=fast", "is not a valid float"),
    ("learning_rate=nan", "finite"),
    ("bias=maybe", "write true or false"),
    ("learning_rate", "is not key=value"),
    ("n_head=3", "divisible by n_head"),
    ("dropout=1.5", "dropout must be in [0, 1)"),
    ("backend=tpu", "backend must be"),
])
def test_bad_set_values_are_refused_by_name(pair, fragment):
    with pytest.raises(UserError) as info:
        apply_overrides(TrainConfig(), [pair])
    assert fragment in str(info.value)


def test_parse_overrides_keeps_equals_signs_in_values():
    assert parse_overrides(["a=b=c", " seed = 3"]) == [("a", "b=c"), ("seed", " 3")]


def test_presets_load_and_nano_cpu_is_the_issue_recipe():
    assert {"nano-cpu", "gpt2-124m", "demo"} <= set(preset_names())
    from scratchlm.config import read_preset
    from scratchlm.models.registry import get_family, resolve_config
    for name in preset_names():                  # every preset loads, for the model it names (default gpt)
        resolve_config(get_family(read_preset(name).get("model", "gpt")), preset=name)
    nano = load_preset("nano-cpu")
    recipe = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0,
                  learning_rate=1e-3, min_lr=1e-4, lr_decay_iters=2000, max_iters=2000, warmup_iters=100,
                  beta1=0.9, beta2=0.99, grad_clip=1.0)
    assert {k: getattr(nano, k) for k in recipe} == recipe
    gpt2 = load_preset("gpt2-124m")
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.block_size) == (12, 12, 768, 1024)
    with pytest.raises(UserError, match="unknown preset 'nano-gpu'.*did you mean 'nano-cpu'"):
        load_preset("nano-gpu")


def test_resume_drops_a_metrics_line_cut_off_mid_write(tmp_path, corpus_file):
    config = tiny_config(max_iters=4, eval_interval=2)
    train(apply_overrides(config, ["max_iters=2"]), tmp_path / "run", corpus=str(corpus_file), progress=False)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "iter": 2, "train_lo')              # a crash in the middle of a line
    train(config, tmp_path / "run", resume=True, progress=False)
    iters = [m["iter"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "train"]
    assert iters == [0, 1, 2, 3]


def test_a_training_step_never_waits_for_the_device(tmp_path, corpus_file, monkeypatch):
    """On the strict (CuPy-like) backend, train_step must not read anything back to the host:
    no float()/bool() of a device array and no .get(), .item() or .tolist() -- each of those is a
    device->host sync on a GPU. Losses come back in one transfer per log_interval (``_flush``)."""
    from types import SimpleNamespace

    from strict_backend import StrictArray
    from scratchlm.tokenizers import CharTokenizer
    from scratchlm.train import Trainer

    text = corpus_file.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    ids = np.array(tokenizer.encode(text), dtype=np.uint16)
    backend.use_backend("strict")
    try:
        trainer = Trainer(tiny_config(grad_clip=1.0, gradient_accumulation_steps=2),
                          tokenizer, SimpleNamespace(train=ids, val=ids), tmp_path / "run", progress=False)
        reads = []

        def forbid(name):
            def read(self, *args, **kwargs):
                reads.append(name)
                raise AssertionError(f"train_step read a device array back with {name}")
            return read
        for name in ("get", "__float__", "__bool__", "__int__"):
            monkeypatch.setattr(StrictArray, name, forbid(name))
        original_getattr = StrictArray.__getattr__

        def no_item(self, name):
            if name in ("item", "tolist"):
                forbid(name)(self)
            return original_getattr(self, name)
        monkeypatch.setattr(StrictArray, "__getattr__", no_item)
        steps = [trainer.train_step(it) for it in range(3)]
        monkeypatch.undo()
        assert reads == []
        losses = [float(backend.to_numpy(loss)) for loss, _, _ in steps]
        assert all(math.isfinite(loss) for loss in losses)
    finally:
        backend.use_backend("numpy")
