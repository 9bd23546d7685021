"""The training loop: batches in, loss down, checkpoints out -- and a run that can be resumed exactly.

    from scratchlm.config import load_preset
    from scratchlm.train import train
    config = load_preset("nano-cpu")                      # a TrainConfig
    result = train(config, out_dir="runs/nano", corpus="tinyshakespeare", tokenizer="char")

One loop serves every model. What differs between models lives in two small objects:

- the model, built by its family (``scratchlm.models.registry``: name -> config dataclass,
  constructor, data kind, presets; ``train(..., model="lstm")``, ``scratchlm train --model lstm``);
- the task (``scratchlm.tasks``), which hands out the batches and says what the loss of one is:
  ``task.sampler(split, B, T, seed).batch(step)`` and ``task.loss(model, batch)`` (language models:
  ``model(x, y)[1]``), plus ``task.whole_split`` for ``scratchlm eval``. A token stream and a corpus
  of documents (names) are the two language-model tasks; a seq2seq, classifier, VAE or GAN family
  brings its own task (pairs, labels, images) and the loop below does not change. A model whose
  loss depends on the iteration defines ``training_loss(batch, it)`` (the VAE's KL annealing), and
  one whose update is not "one loss, one optimizer" defines ``train_step(trainer, it, lr)``, called
  in place of ``Trainer.train_step``'s body (the GAN's phases); see ``Trainer.train_step``.

The loop lives here; its neighbours hold the rest of a run: ``scratchlm.config`` the knobs
(``TrainConfig``, ``--set`` overrides, presets), ``scratchlm.runsetup`` the checks and data before
the first step, ``scratchlm.runlog`` what the run reports (metrics.jsonl, the bar, loss.png) and
``scratchlm.runs`` the run folder it writes (config.json, tokenizer.json, model/optimizer
safetensors, trainer.json).

Why resuming is exact. Everything random in iteration ``it`` is derived from ``(seed, it)``: the
batches come from ``BatchSampler.batch(it * accum + micro)`` (its generator is seeded with the pair)
and dropout draws from a generator re-seeded with ``backend.step_seed(seed, it * accum + micro)``
before each micro-batch (so ranks that split a step's micro-batches draw what one process would:
``scratchlm.distributed``). So there is no RNG state to save (CuPy's cannot be saved anyway); the model
weights, the optimizer moments and step counts, and the iteration number are the whole state, and
a resumed run computes the same float32 numbers in the same order as an uninterrupted one.

Iteration ``it`` (nanoGPT's order):
    1. every ``eval_interval`` iterations (and at the end): evaluate, log, save a checkpoint;
    2. lr <- schedule(it); for each of ``gradient_accumulation_steps`` micro-batches:
       loss = model(x, y) / accum; loss.backward()          (gradients add up: the mean)
    3. clip the global gradient norm to ``grad_clip``; AdamW step; zero the gradients.
A checkpoint taken "at iteration k" holds the state after k completed iterations. Losses stay on
the device until ``log_interval`` iterations have queued (or an eval or save comes): then one
transfer brings them back, and a NaN/inf among them stops the run, naming its iteration.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from scratchlm import backend, distributed, precision
from scratchlm.config import TrainConfig
from scratchlm.errors import UserError
from scratchlm.interrupts import DeferredInterrupt
from scratchlm.runlog import RunLog
from scratchlm.runs import TRAINER_FORMAT, keep_metrics_before, load_checkpoint, save_checkpoint, write_run_header


# ================================================================ the trainer

class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: a checkpoint was saved (the command exits with 130)."""


class TrainingDiverged(UserError):
    """The loss (or the gradient norm) became NaN or infinite: the run stopped without saving it."""


def _quiet_float_errors():
    import numpy as np
    return np.errstate(over="ignore", invalid="ignore")


@dataclass
class TrainResult:
    run_dir: Path
    iteration: int
    best_val_loss: float | None
    last_val_loss: float | None
    elapsed_s: float


class Trainer:
    """Owns one run: the model, the optimizer, the samplers and the run folder.

    ``Trainer(config, tokenizer, prepared, run_dir).fit()``; see ``train()`` for the usual entry.
    """

    def __init__(self, config: TrainConfig, tokenizer, prepared, run_dir, data_info: dict | None = None,
                 resume: bool = False, progress: bool | None = None, log=print, model: str = "gpt",
                 model_config=None):
        from scratchlm.models.registry import build_model, flops_per_token, get_family, optimizer_groups
        from scratchlm.optim import AdamW, constant_lr, cosine_with_warmup
        from scratchlm.tasks import as_task
        self.config, self.tokenizer, self.run_dir = config, tokenizer, Path(run_dir)
        self.progress = progress
        c = config
        backend.keep_freed_host_memory()        # NumPy temporaries reuse warm pages (see backend)
        precision.use(c.dtype)                  # bfloat16: bf16 matmul inputs (scratchlm.precision)
        # the model: its family builds it from a config object (or from overrides in a dict)
        self.family = get_family(model)
        if model_config is None or isinstance(model_config, dict):
            model_config = self.family.model_config(c, model_config or {}, tokenizer.vocab_size)
        self.model = build_model(self.family.name, model_config, seed=c.seed)
        self.params = list(self.model.parameters())
        self.optimizer = AdamW(optimizer_groups(self.model, c.weight_decay), lr=c.learning_rate,
                               betas=(c.beta1, c.beta2), eps=1e-8, weight_decay=c.weight_decay)
        # parameters and gradients as views of flat buffers, laid out group by group: one AdamW
        # update per group, one clipping pass, one all-reduce (scratchlm.nn.FlatStorage)
        self.model.flatten_([group["params"] for group in self.optimizer.param_groups])
        self.dist = distributed.current(c.backend)   # rank 0 alone writes the run folder
        self.optimizer = self.dist.shard_optimizer(self.optimizer, self.model._flat, c.zero_stage,
                                                 bucket_mb=c.ddp_bucket_mb)
        self.zero = isinstance(self.optimizer, distributed.ZeroOneOptimizer)
        self.schedule = (cosine_with_warmup(c.learning_rate, c.warmup_iters, c.lr_decay_iters, c.min_lr)
                         if c.decay_lr else constant_lr(c.learning_rate))
        # the data: a task (scratchlm.tasks) hands out the batches; a Prepared is a stream task
        self.task = as_task(prepared)
        if not resume and hasattr(self.task, "init_model"):            # e.g. word vectors -> embedding
            self.task.init_model(self.model)
        self.sampler = self.task.sampler("train", c.batch_size, c.block_size, seed=c.seed)
        # Evals draw the same eval_iters batches every time (fixed seeds), so evals are comparable.
        self.eval_samplers = {split: self.task.sampler(split, c.batch_size, c.block_size, seed=c.seed + 1_000_000 + k)
                              for k, split in enumerate(("train", "val"))}
        # positions per iteration (a document batch is as wide as its longest document, padding included)
        self.tokens_per_iter = c.batch_size * self.sampler.block_size * c.gradient_accumulation_steps
        self.report = RunLog(self.run_dir, c, progress, log, self.tokens_per_iter,
                             flops_per_token(self.model) * self.tokens_per_iter)
        self.iteration, self.best_val_loss, self.last_val_loss, self.last_saved = 0, None, None, None
        self.best_score = None              # a task's selection_score (classifiers: dev accuracy)
        self.evaluated_at: set[int] = set()
        header = (self.run_dir, config, model_config, None if resume else tokenizer, data_info or {}, self.family.name)
        if resume:
            state = load_checkpoint(self.run_dir, self.model, self.optimizer)
            self.iteration, self.best_val_loss = state["iteration"], state.get("best_val_loss")
            self.last_val_loss, self.last_saved = state.get("last_val_loss"), state["iteration"]
            self.best_score = state.get("best_score")
            if self.dist.is_main:
                kept = keep_metrics_before(self.report.metrics_path, self.iteration)     # reads (and refuses) before writing
                write_run_header(*header)                                       # new max_iters etc.
                self.evaluated_at = {m["iter"] for m in kept if m.get("kind") == "eval"}
        elif self.dist.is_main:
            write_run_header(*header)
            self.report.metrics_path.write_text("", encoding="utf-8")

    # ------------------------------------------------------------ one iteration (the profiled part)

    def train_step(self, it: int):
        """One optimizer step: (mean loss over the micro-batches, gradient norm before clipping or
        None, lr). Loss and norm stay 0-d backend arrays: nothing here waits for the device, so a
        GPU queues step after step; ``_flush`` reads them back in one transfer every few steps.

        A model may shape its step: ``training_loss(batch, it) -> (loss, terms)`` replaces the task's
        loss (the VAE's KL weight depends on ``it``; ``terms`` such as recon and KL go to
        metrics.jsonl), and ``train_step(trainer, it, lr)`` replaces the whole update (the GAN's
        phases and two parameter groups); both leave the loop, evals and checkpoints to the trainer."""
        c, accum = self.config, self.config.gradient_accumulation_steps
        lr = self.schedule(it)
        self.step_terms = {}                                        # a loss's terms for metrics.jsonl
        if hasattr(self.model, "train_step"):                       # its own update (a GAN's phases)
            return self.model.train_step(self, it, lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum, terms_sum = 0.0, {}
        for micro in self.dist.micro_steps(accum):                  # all of them, or this rank's share
            backend.manual_seed(backend.step_seed(c.seed, it * accum + micro))   # dropout's draws
            batch = self.sampler.batch(it * accum + micro)          # LMs: x, y (B, T)
            if hasattr(self.model, "training_loss"):                # a loss that depends on it (the
                loss, terms = self.model.training_loss(batch, it)   # VAE's KL weight), with its terms
                terms_sum = {k: terms_sum.get(k, 0.0) + v / accum for k, v in terms.items()}
            else:
                loss = self.task.loss(self.model, batch)
            (loss / accum).backward()                               # grads add up to the mean's
            loss_sum = loss_sum + loss.data                         # stays on the device
        self.step_terms = terms_sum
        if self.dist.world > 1:                                     # every rank: the sum over all A
            loss_sum = self.dist.sum([loss_sum])[0]
        if self.zero:           # ZeRO-1: reduce-scatter, clip, update this rank's slice, all-gather
            grad_norm = self.optimizer.step(c.grad_clip)
            self.optimizer.zero_grad()
            return loss_sum / accum, grad_norm, lr
        if self.dist.world > 1:
            self.dist.reduce_gradients(self.model._flat)
        grad_norm = self.clip_and_step()
        return loss_sum / accum, grad_norm, lr

    def clip_and_step(self, params=None):
        """Clip the gradients of ``params`` (default all) to ``grad_clip``, step, zero the gradients;
        returns the norm before clipping (a 0-d backend array) or None without clipping."""
        grad_norm = None
        if self.config.grad_clip > 0:
            from scratchlm.optim import clip_grad_norm_
            grad_norm = clip_grad_norm_(self.params if params is None else params, self.config.grad_clip,
                                        as_array=True)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return grad_norm

    def evaluate(self, interrupt: DeferredInterrupt | None = None) -> dict[str, float] | None:
        """Mean loss over the same ``eval_iters`` batches of each split; None if Ctrl-C came meanwhile."""
        from scratchlm.tensor import no_grad
        self.model.eval()
        losses = {}
        try:
            with no_grad():
                for split, sampler in self.eval_samplers.items():
                    total = 0.0
                    for k in range(self.config.eval_iters):
                        if interrupt is not None and interrupt.requested:
                            return None
                        loss = self.task.loss(self.model, sampler.batch(k))
                        total = total + loss.data
                    losses[split] = float(total) / self.config.eval_iters
                if hasattr(self.task, "eval_metrics"):          # a task's own figures (accuracy, dev BLEU)
                    losses.update(self.task.eval_metrics(self.model))
        finally:
            self.model.train()
        return losses

    # ------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        c, start = self.config, time.perf_counter()
        self.report.start(self.iteration)
        self._pending, self._window_start = [], time.perf_counter()
        self.evaluated_at = self.dist.bcast(self.evaluated_at)     # every rank: the same eval points
        try:
            with DeferredInterrupt() as interrupt:
                it = self.iteration
                while True:
                    # every rank stops after the same step: the flag is read once per iteration and
                    # agreed on; a Ctrl-C that lands later (during rank 0's eval) counts at the next
                    stop = self.dist.any(interrupt.requested)
                    due_eval = (it % c.eval_interval == 0 or it == c.max_iters) and it not in self.evaluated_at
                    if due_eval or it >= c.max_iters or stop:
                        self._flush()            # every loss checked before anything is saved
                    if due_eval and self.dist.is_main:
                        losses = self.evaluate(interrupt if self.dist.world == 1 else None)
                        if losses is None:
                            stop = True
                            break
                        self._record_eval(it, losses)
                    if due_eval:
                        self._save(it)
                        self._window_start = time.perf_counter()
                    if it >= c.max_iters or stop:
                        break
                    # overflow shows up as an inf/NaN loss, which _flush reports with the
                    # iteration; NumPy's RuntimeWarnings about it would only add noise
                    with _quiet_float_errors():
                        self._pending.append((it, *self.train_step(it), self.step_terms))
                    it += 1
                    self.iteration = it
                    if it % c.log_interval == 0:
                        self._flush()
                if stop:
                    self._flush()
                    self._save(self.iteration)
                    self._finish_plot()
                    if not self.dist.is_main:
                        raise TrainingInterrupted(f"rank {self.dist.rank}: stopped with rank 0")
                    raise TrainingInterrupted(
                        f"interrupted: saved a checkpoint at iteration {self.iteration} in {self.run_dir}; "
                        f"continue with --resume --out {self.run_dir}")
        finally:
            self.report.close()
        self._finish_plot()
        return TrainResult(self.run_dir, self.iteration, self.best_val_loss, self.last_val_loss,
                           time.perf_counter() - start)

    def _flush(self) -> None:
        """Bring the pending iterations' losses and norms to the host in one transfer, stop at the
        first non-finite one (naming its iteration), and log them all.

        This is the only place the training loop waits for the device (every ``log_interval``
        iterations and before evals and saves), so ms/iter is the mean over the window."""
        if not self._pending or not self.dist.is_main:
            self._pending = []
            return
        xp = backend.xp
        losses = backend.to_numpy(xp.stack([xp.asarray(loss) for _, loss, _, _, _ in self._pending]))
        has_norm = self._pending[0][2] is not None
        norms = backend.to_numpy(xp.stack([norm for _, _, norm, _, _ in self._pending])) if has_norm else None
        seconds = (time.perf_counter() - self._window_start) / len(self._pending)
        for k, (it, _, _, lr, terms) in enumerate(self._pending):
            loss, grad_norm = float(losses[k]), float(norms[k]) if has_norm else None
            if not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))):
                self._pending = []
                self._diverged(it, loss, grad_norm)
            self.report.train(it, loss, grad_norm, lr, seconds, {key: float(v) for key, v in terms.items()})
        self._pending, self._window_start = [], time.perf_counter()

    # ------------------------------------------------------------ bookkeeping

    def _record_eval(self, it, losses) -> None:
        """Keep the eval's figures, write them down, and keep the best-scoring weights so far."""
        val = losses["val"]
        self.last_val_loss = val
        if self.best_val_loss is None or val < self.best_val_loss:
            self.best_val_loss = val
        self.evaluated_at.add(it)
        self.report.eval(it, losses, self.schedule(it))
        score = losses.get("selection_score")
        if score is not None and (self.best_score is None or score > self.best_score):
            # model selection: the weights of the best eval so far, beside the latest checkpoint
            from scratchlm.checkpoint import save_safetensors
            save_safetensors(self.run_dir / "best.safetensors", self.model.state_dict(), metadata={"iteration": str(it)})
            self.best_score = score

    def _save(self, it: int) -> None:
        if self.zero:
            self.optimizer.gather()             # collective: the moments' slices come together
        if not self.dist.is_main:
            return
        save_checkpoint(self.run_dir, self.model, self.optimizer, {
            "format": TRAINER_FORMAT, "iteration": it, "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss, "best_score": self.best_score, "seed": self.config.seed,
            "backend": backend.get_backend(), "tokens_seen": it * self.tokens_per_iter, "nproc": self.dist.world,
            "sampler": self.sampler.state_dict(),
            "rng": "none saved: micro-batch it*accum+m draws from backend.step_seed(seed, it*accum+m) and "
                   "BatchSampler.batch(it*accum+m)"})
        self.last_saved = it

    def _diverged(self, it, loss, grad_norm):
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        where = (f"the last good checkpoint is {self.run_dir} (iteration {self.last_saved})"
                 if self.last_saved is not None else "no checkpoint was saved yet")
        raise TrainingDiverged(f"{what} at iteration {it}; stopped: {where}; lower learning_rate "
                               f"(now {self.config.learning_rate:g}) or grad_clip, or raise warmup_iters")

    def _finish_plot(self) -> None:
        if self.dist.is_main:
            self.report.plot()


# ================================================================ the entry point

def train(config: TrainConfig, out_dir, corpus=None, tokenizer: str = "char", resume: bool = False,
          progress: bool | None = None, cache_dir=None, overwrite: bool = False, log=print,
          model: str | None = None, model_config: dict | None = None) -> TrainResult:
    """Train (or, with ``resume=True``, continue) the run in ``out_dir``; see the module docstring.

    ``corpus`` is a registered name, a path, or a ``Corpus``; on resume it defaults to the run's.
    ``model`` names the family (``scratchlm.models.registry``; default gpt, on resume the run's) and
    ``model_config`` its overrides (a dict of the family's config keys; the GPT reads ``config``).
    ``progress``: True/False forces the bar on/off; None shows it on a terminal and prints lines otherwise.

    Everything is checked before the run folder is touched (config, corpus, tokenizer, the
    memory estimate, on resume the saved state and metrics), then the folder's lock is taken
    (``scratchlm.runguard``): a refused call leaves the folder as it was.
    """
    from scratchlm.memory import check_fits_in_memory
    from scratchlm.models.registry import get_family
    from scratchlm.runguard import open_run_for_writing
    from scratchlm.runsetup import prepare_run
    run_dir = Path(out_dir)
    ready = {}
    dist = distributed.current(config.backend)

    def validate():
        dist.check_config(config)
        ready.update(prepare_run(config, run_dir, corpus, tokenizer, resume, progress, cache_dir, model, model_config))
        built = ready["model_config"]                     # overrides (a dict), or a resumed run's config
        if built is None or isinstance(built, dict):
            built = get_family(ready["model"]).model_config(config, built or {}, ready["tok"].vocab_size)
        check_fits_in_memory(built, config.batch_size, config.block_size)

    def run():
        trainer = Trainer(config, ready["tok"], ready["task"], run_dir, ready["data_info"], resume=resume,
                          progress=progress if dist.is_main else False, log=log, model=ready["model"],
                          model_config=ready["model_config"])
        if dist.is_main:
            dist.barrier()          # the run folder is checked and set up: the other ranks may read it
        if resume and progress is not False and dist.is_main:
            log(f"resuming {run_dir} at iteration {trainer.iteration} of {config.max_iters}")
        return trainer.fit()

    with dist.fail_fast():          # with several ranks: an error on one ends them all, in one line
        if not dist.is_main:        # the other ranks only read the folder, once rank 0 has set it up
            dist.barrier()
            validate()
            return run()
        with open_run_for_writing(run_dir, resume=resume, validate=validate, overwrite=overwrite):
            return run()
