"""A text GAN: SeqGAN (Yu et al. 2017) on scratchlm's engine.

    generator G     = an LSTM language model (models/rnn.py's RNNLM): p(w_t | w_<t)
    discriminator D = a CNN sentence classifier (Kim 2014 / SeqGAN's): embeddings E_D (B, T, C_D),
                      for each width k a convolution over k consecutive words
                          c^k_t = relu([E_D w_t; ..; E_D w_{t+k-1}] W_k + b_k)     (B, T-k+1, F)
                      max over time -> (B, F) per width, concatenated -> (B, K F) -> linear -> logit;
                      D(s) = sigmoid(logit) = P(s is a real sentence)

Why policy gradient with Monte-Carlo rollouts, not Gumbel-softmax. Sampling a word is not
differentiable. Gumbel-softmax would feed D soft mixtures of word vectors, which real sentences
never are: D can tell them apart by their softness alone, and the relaxation's bias grows as its
temperature falls. The policy gradient keeps every sentence discrete (D sees what it will judge
at test time, and G stays an ordinary sampler) and needs only log p of sampled words:

    grad J = E_{s ~ G} sum_t (Q(s_<=t) - b_t) grad log G(s_t | s_<t)              (REINFORCE)
    Q(s_<=t) = 1/N sum_n D(s_<=t + a completion of it sampled from G)   for t < |s|,  D(s) at t = |s|

Q is SeqGAN's Monte-Carlo estimate of the reward of an unfinished sentence (N = ``rollouts``
completions; N = 0 uses D(s) for every word: sequence-level REINFORCE). The baseline b_t is the
batch mean of Q at position t (lowers the variance; the gradient stays unbiased).

Training is one Trainer run whose phase is chosen by iteration (``train_step``):
    it < g_pretrain_iters                    G by maximum likelihood (teacher forcing)
    .. + d_pretrain_iters                    D on real sentences (label 1) vs G's samples (label 0)
    after that, each iteration               one policy-gradient step of G, then d_steps D steps
Both live in the trainer's one AdamW (its moments per parameter); a step updates only the
parameters that got a gradient. G's pretraining uses the trainer's learning-rate schedule; the
adversarial G steps use ``pg_learning_rate`` and D ``d_learning_rate``.

``model(idx, targets)`` is G's (logits, loss), so validation, ``scratchlm eval`` (test NLL) and the
sampler (``init_state`` / ``step``) treat the GAN as the language model it is.

Shapes: B batch, T time, C = n_embd, H = n_hidden, V vocabulary, F = d_filters, K = widths.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from .. import nn
from ..nn import functional as F
from ..ops.shape import concatenate
from ..tensor import Tensor, no_grad
from .gpt import ModelArgumentError
from .rnn import RNNLM, RNNLMConfig, _Config

IGNORE_INDEX = -100
PHASES = {"mle": 0, "discriminator": 1, "adversarial": 2}


@dataclasses.dataclass
class GANConfig(_Config):
    vocab_size: int = 2592
    block_size: int = 38             # T: padded sentence length (the document task's)
    n_embd: int = 128                # generator C
    n_hidden: int = 256              # generator H
    n_layer: int = 1
    dropout: float = 0.0             # generator (MLE phase)
    d_embd: int = 64                 # discriminator C_D
    d_widths: str = "2,3,4,5"        # convolution widths
    d_filters: int = 64              # F per width
    d_dropout: float = 0.25          # on D's pooled features
    g_pretrain_iters: int = 2000
    d_pretrain_iters: int = 200
    d_steps: int = 1                 # D steps per adversarial G step
    rollouts: int = 4                # N completions per prefix (0: D(s) for every word)
    pg_learning_rate: float = 1e-4
    d_learning_rate: float = 1e-3
    _positive = ("vocab_size", "block_size", "n_embd", "n_hidden", "n_layer", "d_embd", "d_filters", "d_steps")

    def __post_init__(self):
        super().__post_init__()
        try:
            widths = self.widths()
        except ValueError:
            widths = []
        if not widths or min(widths) < 1:
            raise ModelArgumentError(f"d_widths must be comma-separated positive integers, got {self.d_widths!r}")
        if max(widths) > self.block_size:
            raise ModelArgumentError(f"d_widths {self.d_widths} has a width above block_size {self.block_size}")
        for name in ("g_pretrain_iters", "d_pretrain_iters", "rollouts"):
            if getattr(self, name) < 0:
                raise ModelArgumentError(f"{name} must be >= 0, got {getattr(self, name)}")

    def widths(self) -> list[int]:
        return [int(w) for w in str(self.d_widths).split(",") if w.strip()]

    def generator_config(self) -> RNNLMConfig:
        return RNNLMConfig(vocab_size=self.vocab_size, block_size=self.block_size, n_embd=self.n_embd,
                           n_hidden=self.n_hidden, n_layer=self.n_layer, dropout=self.dropout, cell="lstm")

    def num_parameters(self) -> int:
        V, C, F, widths = self.vocab_size, self.d_embd, self.d_filters, self.widths()
        return (self.generator_config().num_parameters() + V * C + sum(k * C * F + F for k in widths)
                + len(widths) * F + 1)

    def memory_estimate(self, batch_size: int, block_size: int | None = None, bytes_per_value: int = 4) -> dict:
        """The generator's (RNNLMConfig's), plus the policy gradient's log-softmax B T V, plus the
        discriminator on 2B sentences: embeddings, and per width k its windows and activations
        2B T (k C_D + F)."""
        B, T = batch_size, block_size or self.block_size
        generator = self.generator_config().memory_estimate(B, T, 1)["activations"]
        discriminator = 2 * B * T * (self.d_embd + sum(k * self.d_embd + self.d_filters for k in self.widths()))
        activations = generator + B * T * self.vocab_size + discriminator
        return self._memory(self.num_parameters(), activations, bytes_per_value)

    def phase(self, it: int) -> str:
        if it < self.g_pretrain_iters:
            return "mle"
        if it < self.g_pretrain_iters + self.d_pretrain_iters:
            return "discriminator"
        return "adversarial"


class Discriminator(nn.Module):
    """CNN sentence classifier: token ids (B, T) -> logits (B,) of "real". See the module docstring."""

    def __init__(self, vocab_size: int, d_embd: int, widths: list[int], filters: int, dropout: float, rng):
        self.widths = list(widths)
        self.wte = nn.Embedding(vocab_size, d_embd, rng=rng)
        self.convs = nn.ModuleList([nn.Linear(k * d_embd, filters, rng=rng) for k in self.widths])
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(len(self.widths) * filters, 1, rng=rng)

    def forward(self, tokens):
        e = self.wte(tokens)                                                    # (B, T, C_D)
        T = e.shape[1]
        pooled = []
        for k, conv in zip(self.widths, self.convs):
            windows = concatenate([e[:, j:T - k + 1 + j] for j in range(k)], axis=2)   # (B, T-k+1, k C_D)
            pooled.append(conv(windows).relu().max(axis=1))                     # (B, F): max over time
        features = self.drop(concatenate(pooled, axis=1))                       # (B, K F)
        return self.head(features).reshape(-1)                                  # (B,)


class SeqGAN(nn.Module):
    """Generator (an RNNLM) + discriminator (a CNN); trained in phases by ``train_step``."""

    def __init__(self, config: GANConfig, seed: int = 0):
        self.config = c = config
        rng = np.random.default_rng(seed)
        self.generator = RNNLM(c.generator_config(), seed=int(rng.integers(2 ** 31)))
        self.discriminator = Discriminator(c.vocab_size, c.d_embd, c.widths(), c.d_filters, c.d_dropout, rng)

    # ------------------------------------------------------------ G as a language model

    def forward(self, idx, targets=None):
        return self.generator(idx, targets)

    def init_state(self, batch_size: int = 1):
        return self.generator.init_state(batch_size)

    def step(self, token_ids, state):
        return self.generator.step(token_ids, state)

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """The generator's groups (its own rule), then the discriminator's: matrices decayed, the rest not.
        Every group holds parameters of one network only, which ``_set_lr`` relies on."""
        ids = {id(p) for p in self.generator.parameters()}
        d = [p for p in self.parameters() if id(p) not in ids]
        return self.generator.configure_optimizer_groups(weight_decay) + \
            [{"params": [p for p in d if p.ndim == 2], "weight_decay": weight_decay},
             {"params": [p for p in d if p.ndim != 2], "weight_decay": 0.0}]

    # ------------------------------------------------------------ sentences

    def sample_batch(self, n: int, boundary: int, T: int, seed: int):
        """n sentences from G as a framed batch (x, y) (n, T) like the document task's: x = b + words
        (+ b padding), y = words + b (+ -100); at most T - 1 words."""
        from ..generate import sample_documents
        rows = sample_documents(self.generator, boundary, n, T - 1, seed=seed)
        return frame(rows, boundary, T)

    def d_loss(self, real_y, fake_y, boundary: int):
        """BCE of D: real sentences (y of the task, -100 -> boundary; host arrays) labelled 1, G's
        labelled 0; returns (loss, accuracy as a 0-d array)."""
        tokens = np.concatenate([as_tokens(real_y, boundary), as_tokens(fake_y, boundary)])   # (2B, T) host
        labels = backend.to_device(np.concatenate([np.ones(len(real_y)), np.zeros(len(fake_y))]),
                                   self.discriminator.head.weight.dtype)        # (2B,)
        logits = self.discriminator(backend.to_device(tokens))                  # (2B,)
        accuracy = ((logits.data > 0) == (labels > 0.5)).mean()
        return F.binary_cross_entropy_with_logits(logits, labels), accuracy

    def rewards(self, x, y, boundary: int, seed: int):
        """Q (B, T) of each generated word (0 after the end), host float64: D's probability of the
        sentence for its last word and boundary, and for earlier words the mean over ``rollouts``
        completions of the prefix (see the module docstring)."""
        from ..generate import iter_tokens
        B, T = y.shape
        real = y != IGNORE_INDEX                                                # (B, T) host
        lengths = real.sum(axis=1)                                              # words + boundary
        was = self.discriminator.training
        self.discriminator.eval()
        try:
            with no_grad():
                whole = self._real_prob(y, boundary)                            # (B,)
                Q = np.where(real, whole[:, None], 0.0)
                N = self.config.rollouts
                for t in range(1, int(lengths.max()) - 1 if N else 0):          # prefix: t words
                    open_rows = np.flatnonzero(lengths - 1 > t)                 # sentences longer than t words
                    if not len(open_rows):
                        break
                    prompt = np.repeat(x[open_rows, :t + 1], N, axis=0)         # (R N, t + 1): b + t words
                    done = np.zeros(len(prompt), dtype=bool)
                    tails = [[] for _ in range(len(prompt))]
                    for token in iter_tokens(self.generator, prompt, T - 1 - t, seed=seed + t):
                        for r in np.flatnonzero(~done):
                            if token[r] == boundary:
                                done[r] = True
                            else:
                                tails[r].append(int(token[r]))
                        if done.all():
                            break
                    rows = [list(prompt[r, 1:]) + tails[r] for r in range(len(prompt))]
                    _, completed = frame(rows, boundary, T)
                    q = self._real_prob(completed, boundary).reshape(len(open_rows), N).mean(axis=1)
                    Q[open_rows, t - 1] = q
        finally:
            self.discriminator.train(was)
        return Q

    def _real_prob(self, y, boundary):
        logits = backend.to_numpy(self.discriminator(backend.to_device(as_tokens(y, boundary))).data)
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))

    def pg_loss(self, x, y, Q):
        """-(1/N) sum_bt (Q_bt - b_t) log G(y_bt | x_<=t), b_t = mean of Q over the batch's words at t."""
        real = y != IGNORE_INDEX
        counts = np.maximum(real.sum(axis=0), 1)
        baseline = (Q * real).sum(axis=0) / counts                             # (T,)
        advantage = np.where(real, Q - baseline, 0.0)                           # (B, T)
        logits = self.generator(backend.to_device(x))[0]                        # (B, T, V)
        logp = F.log_softmax(logits, axis=-1)
        B, T = y.shape
        picked = logp[np.arange(B)[:, None], np.arange(T)[None, :], np.where(real, y, 0)]   # (B, T)
        weights = Tensor(backend.to_device(advantage / real.sum(), logp.dtype))
        return -(picked * weights).sum()

    # ------------------------------------------------------------ the trainer's step

    def train_step(self, trainer, it: int, lr: float):
        """One iteration of the phase ``it`` falls in (module docstring). Returns (loss, grad norm, lr)
        like Trainer.train_step and puts the phase's figures in trainer.step_terms."""
        c = self.config
        phase = c.phase(it)
        boundary = _boundary_of(trainer)
        x_real, y_real = trainer.sampler.batch(it)                              # (B, T) x2, device
        B, T = y_real.shape
        rng_seed = int(backend.step_seed(trainer.config.seed, it)) % (2 ** 31)
        terms = {"phase": PHASES[phase]}
        g_params = [p for p in self.generator.parameters()]
        d_params = [p for p in self.discriminator.parameters()]
        if phase == "mle":
            self._set_lr(trainer, generator=lr)
            _, loss = self.generator(x_real, y_real)
            loss.backward()
            norm = trainer.clip_and_step(g_params)
            trainer.step_terms = terms
            return loss.data, norm, lr
        if phase == "adversarial":
            self._set_lr(trainer, generator=c.pg_learning_rate)
            x_fake, y_fake = self.sample_batch(B, boundary, T, seed=rng_seed)
            Q = self.rewards(x_fake, y_fake, boundary, seed=rng_seed)
            loss = self.pg_loss(x_fake, y_fake, Q)
            loss.backward()
            trainer.clip_and_step(g_params)
            terms["reward"] = float((Q * (y_fake != IGNORE_INDEX)).sum() / (y_fake != IGNORE_INDEX).sum())
            terms["pg_loss"] = float(loss.data)
            trainer.step_terms = terms
        d_steps = 1 if phase == "discriminator" else c.d_steps
        self._set_lr(trainer, discriminator=c.d_learning_rate)
        for k in range(d_steps):
            _, y_fake = self.sample_batch(B, boundary, T, seed=rng_seed + 1 + k)
            d_loss, accuracy = self.d_loss(backend.to_numpy(y_real), y_fake, boundary)
            d_loss.backward()
            norm = trainer.clip_and_step(d_params)
        terms["d_loss"], terms["d_accuracy"] = float(d_loss.data), float(accuracy)
        trainer.step_terms = terms
        with no_grad():                                                         # the line's train_loss: G's NLL
            _, g_nll = self.generator(x_real, y_real)
        return g_nll.data if phase == "adversarial" else d_loss.data, norm, lr

    def _set_lr(self, trainer, generator=None, discriminator=None):
        g_ids = {id(p) for p in self.generator.parameters()}
        for group in trainer.optimizer.param_groups:
            if not group["params"]:
                continue
            lr = generator if id(group["params"][0]) in g_ids else discriminator
            if lr is not None:
                group["lr"] = lr


def _boundary_of(trainer) -> int:
    task = trainer.task
    return int(getattr(task, "boundary", 0))


def as_tokens(y, boundary: int):
    """y (B, T) host array with -100 padding -> token ids with the boundary there (D reads words + boundaries)."""
    return np.where(y == IGNORE_INDEX, boundary, y)


def frame(rows, boundary: int, T: int):
    """Lists of word ids -> (x, y) host int64 (B, T), framed as scratchlm.tasks.DocumentLM frames them
    (words past T - 1 are cut)."""
    x = np.full((len(rows), T), boundary, dtype=np.int64)
    y = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
    for r, words in enumerate(rows):
        words = list(words)[:T - 1]
        x[r, 1:len(words) + 1] = words
        y[r, :len(words)] = words
        y[r, len(words)] = boundary
    return x, y


__all__ = ["GANConfig", "SeqGAN", "Discriminator", "frame"]
