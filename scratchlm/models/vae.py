"""A sentence variational autoencoder (Bowman et al. 2016, "Generating Sentences from a Continuous Space").

    h        = LSTM_enc(E[w_1 .. w_n b])[last real position]          (B, H)   the sentence read once
    h        = [h; LSTM_rev(E[b w_n .. w_1])[last]]   (bidirectional)  (B, 2H)  ... and backwards
    mu       = h W_mu + b_mu;  l = log sigma^2 = h W_l + b_l           (B, D)   q(z|x) = N(mu, diag e^l)
    z        = mu + exp(l / 2) * eps,  eps ~ N(0, I)                   (B, D)   ops.latent.reparameterise
    h_0      = tanh(z W_z + b_z) per decoder layer, c_0 = 0            (L, B, H) z starts the decoder ...
    o_t      = LSTM_dec([E[x_t]; z], state)                            (B, T, H) ... and is fed at every step
    logits_t = o_t W_out + b_out                                       (B, T, V)

x = b w_1 .. w_n and y = w_1 .. w_n b are a sentence framed by the boundary token b (the document
task of scratchlm.tasks; y is -100 on padding). The training objective is the negative ELBO

    -ELBO(x) = E_q[-log p(x|z)] + KL(q(z|x) || N(0, I))  >=  -log p(x)
             ~ recon(z) + KL        (one z per sentence; the KL in closed form, ops.latent.gaussian_kl)

and three remedies for posterior collapse (the decoder ignoring z, KL -> 0):
- KL annealing: loss = recon + beta(it) KL, beta rising from 0 to 1 by iteration, linearly over
  ``kl_anneal_iters`` or logistically 1 / (1 + exp(-k (it - x0))) (Bowman's two schedules);
- word dropout: each decoder input word (not the first boundary) becomes <unk> with probability
  ``word_dropout``, so the decoder must lean on z to predict the next word;
- free bits (Kingma et al. 2016): each latent dimension's batch-mean KL counts at least
  ``free_bits`` nats, so the optimizer gains nothing by pushing it below that.

All three shape training only: ``model(x, y)`` returns the plain bound per token
(recon + KL) / tokens, which is what evaluation and validation report.

Evaluation (``evaluate``): reconstruction NLL and KL per sentence, the importance-weighted bound
(Burda et al. 2016) with k samples,

    -log p(x) <= -log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x),    z_i ~ q(z|x)

(k = 1 is the ELBO in expectation; it tightens as k grows), the perplexity exp(bound / tokens),
and the active units: dimensions d with Var_x(E_q[z_d]) = Var_x(mu_d) >= 0.01 (Burda et al.).

Uses: ``sample`` (z from the prior), ``reconstruct`` (z = mu of a sentence), ``interpolate``
(z along the line between two sentences' mu: the homotopy of Bowman et al.), all decoding with
the library's one sampler (``scratchlm.generate.iter_tokens``) through ``decoder_for(z)``.

Shapes: B batch, T time, C = n_embd, H = n_hidden, D = n_latent, L = n_layer, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import backend
from .. import nn
from ..nn import functional as F
from ..ops.latent import gaussian_kl, reparameterise
from ..ops.shape import concatenate
from ..tensor import Tensor, no_grad
from .gpt import ModelArgumentError, _index_array
from .rnn import _Config, _fill

IGNORE_INDEX = -100
SCHEDULES = ("logistic", "linear", "none")


@dataclasses.dataclass
class VAEConfig(_Config):
    vocab_size: int = 2592
    block_size: int = 38              # the padded sentence length T (the document task's)
    n_embd: int = 128                 # C, shared by encoder and decoder
    n_hidden: int = 256               # H, encoder and decoder LSTMs
    n_layer: int = 1                  # L, decoder layers (the encoder has one)
    n_latent: int = 32                # D
    dropout: float = 0.0              # on the embeddings and the decoder output
    word_dropout: float = 0.25        # decoder inputs -> <unk>
    unk_id: int = 1                   # the word tokenizer's <unk>
    kl_anneal: str = "logistic"       # logistic | linear | none
    kl_anneal_iters: int = 2000       # linear: iterations to reach 1; logistic: 2x the midpoint x0
    kl_anneal_k: float = 0.0025       # logistic steepness k
    free_bits: float = 0.0            # nats per latent dimension (batch mean); 0 = off
    bidirectional: bool = False       # a second encoder LSTM reads each sentence backwards
    _positive = ("vocab_size", "block_size", "n_embd", "n_hidden", "n_layer", "n_latent")

    def __post_init__(self):
        super().__post_init__()
        if self.kl_anneal not in SCHEDULES:
            raise ModelArgumentError(f"kl_anneal must be one of {', '.join(SCHEDULES)}, got {self.kl_anneal!r}")
        if not 0 <= self.word_dropout <= 1:
            raise ModelArgumentError(f"word_dropout must be in [0, 1], got {self.word_dropout!r}")
        if self.free_bits < 0:
            raise ModelArgumentError(f"free_bits must be >= 0 nats, got {self.free_bits!r}")
        if self.kl_anneal_iters < 1 or self.kl_anneal_k <= 0:
            raise ModelArgumentError("kl_anneal_iters must be >= 1 and kl_anneal_k > 0")

    def kl_weight(self, it: int) -> float:
        """beta(it): the KL term's weight at iteration ``it`` (Bowman et al.'s schedules)."""
        if self.kl_anneal == "none":
            return 1.0
        if self.kl_anneal == "linear":
            return min(1.0, it / self.kl_anneal_iters)
        x0 = self.kl_anneal_iters / 2
        return 1.0 / (1.0 + math.exp(-self.kl_anneal_k * (it - x0)))

    def num_parameters(self) -> int:
        V, C, H, D, L = self.vocab_size, self.n_embd, self.n_hidden, self.n_latent, self.n_layer
        lstm = lambda n_in: 4 * H * (n_in + H + 2)
        E = 2 if self.bidirectional else 1                                # encoder readers
        return (V * C + E * lstm(C) + 2 * (E * H * D + D) + L * (D * H + H) + lstm(C + D)
                + (L - 1) * lstm(H) + H * V + V)

    def memory_estimate(self, batch_size: int, block_size: int | None = None, bytes_per_value: int = 4) -> dict:
        """As RNNLMConfig's (what the fused LSTM ops save) for the decoder, whose first layer reads
        C + D, plus the encoder layer (input B T C, h and c buffers B (T+1) H, gates 4 B T H, output)."""
        from .rnn import RNNLMConfig
        B, T = batch_size, block_size or self.block_size
        decoder = RNNLMConfig(vocab_size=self.vocab_size, block_size=T, n_embd=self.n_embd + self.n_latent,
                              n_hidden=self.n_hidden, n_layer=self.n_layer, cell="lstm")
        encoder = (B * T * self.n_embd + 3 * B * (T + 1) * self.n_hidden + 4 * B * T * self.n_hidden) \
            * (2 if self.bidirectional else 1)
        activations = decoder.memory_estimate(B, T, 1)["activations"] + encoder
        return self._memory(self.num_parameters(), activations, bytes_per_value)


class SentenceVAE(nn.Module):
    """Embedding -> encoder LSTM -> (mu, log sigma^2) -> z -> decoder LSTM on [E x_t; z] -> head.
    The equations are in the module docstring. Init as the RNN LM's (U(-0.1, 0.1) tables and head)."""

    def __init__(self, config: VAEConfig, seed: int = 0):
        self.config = c = config
        rng = np.random.default_rng(seed)
        self.wte = nn.Embedding(c.vocab_size, c.n_embd, rng=rng)
        _fill(self.wte.weight, rng.uniform(-0.1, 0.1, self.wte.weight.shape))
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.LSTM(c.n_embd, c.n_hidden, batch_first=True, rng=rng)
        if c.bidirectional:
            self.encoder_reverse = nn.LSTM(c.n_embd, c.n_hidden, batch_first=True, rng=rng)
        E = 2 if c.bidirectional else 1
        self.to_mu = nn.Linear(E * c.n_hidden, c.n_latent, rng=rng)
        self.to_logvar = nn.Linear(E * c.n_hidden, c.n_latent, rng=rng)
        self.latent_to_hidden = nn.Linear(c.n_latent, c.n_layer * c.n_hidden, rng=rng)
        self.decoder = nn.LSTM(c.n_embd + c.n_latent, c.n_hidden, num_layers=c.n_layer, batch_first=True, rng=rng)
        self.lm_head = nn.Linear(c.n_hidden, c.vocab_size, rng=rng)
        _fill(self.lm_head.weight, rng.uniform(-0.1, 0.1, self.lm_head.weight.shape))
        _fill(self.lm_head.bias, 0)

    # ------------------------------------------------------------ the pieces

    def encode(self, y):
        """Sentences y (B, T) (words + boundary, -100 after) -> (mu, logvar), each (B, D)."""
        y = _index_array(y, "targets")
        real = y != IGNORE_INDEX                                                # (B, T)
        lengths = real.sum(axis=1)                                              # (B,)
        if int(lengths.min()) < 1:
            raise ValueError("encode: every sentence needs at least one real token (its boundary)")
        tokens = backend.xp.where(real, y, 0)                                   # padding -> id 0
        xp, T = backend.xp, y.shape[1]
        out, _ = self.encoder(self.drop(self.wte(tokens)))                      # (B, T, H)
        rows = xp.arange(y.shape[0])
        last = out[rows, lengths - 1]                                           # (B, H): after the boundary
        if self.config.bidirectional:
            # each row reversed within its own length (b w_n .. w_1, padding still at the end), not
            # the whole padded row: a reverse LSTM over padded rows would read the padding first,
            # and a sentence's code would depend on the longest sentence in its batch
            t = xp.arange(T)[None, :]                                           # (1, T)
            reverse = xp.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)   # (B, T)
            back, _ = self.encoder_reverse(self.drop(self.wte(xp.take_along_axis(tokens, reverse, axis=1))))
            last = concatenate([last, back[rows, lengths - 1]], axis=1)        # (B, 2H): ... after w_1
        return self.to_mu(last), self.to_logvar(last)

    def initial_state(self, z):
        """z (B, D) -> the decoder's (h_0, c_0), each (L, B, H): h_0 = tanh(z W_z + b_z), c_0 = 0."""
        c, B = self.config, z.shape[0]
        h = self.latent_to_hidden(z).tanh().reshape(B, c.n_layer, c.n_hidden).permute(1, 0, 2)   # (L, B, H)
        return h, Tensor(backend.xp.zeros(h.shape, dtype=h.dtype))

    def decode(self, x, z):
        """Teacher-forced logits (B, T, V) of the inputs x (B, T) given z (B, D)."""
        B, T = x.shape
        emb = self.drop(self.wte(x))                                            # (B, T, C)
        z_t = z.reshape(B, 1, self.config.n_latent) * Tensor(backend.xp.ones((1, T, 1), dtype=z.dtype))  # (B, T, D)
        out, _ = self.decoder(concatenate([emb, z_t], axis=2), self.initial_state(z))   # (B, T, H)
        return self.lm_head(self.drop(out))                                     # (B, T, V)

    def _word_dropout(self, x):
        """Each input word but the first (the boundary that starts every sentence) -> <unk> with
        probability word_dropout, while training."""
        p = self.config.word_dropout
        if not self.training or p == 0:
            return x
        drop = backend.default_generator().random(x.shape) < p                 # (B, T)
        drop[:, 0] = False
        return backend.xp.where(drop, self.config.unk_id, x)

    def _eps(self, shape, dtype):
        return backend.to_device(backend.default_generator().standard_normal(shape), dtype)

    # ------------------------------------------------------------ the objective

    def terms(self, x, y, eps=None):
        """(recon, kl, tokens): the summed reconstruction NLL (Tensor), the (B, D) KL terms (Tensor)
        and the number of predicted tokens, for one z per sentence (from ``eps`` or fresh draws)."""
        x, y = _index_array(x, "idx"), _index_array(y, "targets")
        mu, logvar = self.encode(y)                                             # (B, D) x2
        eps = self._eps(mu.shape, mu.dtype) if eps is None else eps
        z = reparameterise(mu, logvar, eps)                                     # (B, D)
        logits = self.decode(self._word_dropout(x), z)                          # (B, T, V)
        tokens = int((y != IGNORE_INDEX).sum())
        recon = F.cross_entropy(logits, y) * tokens                            # summed over tokens
        return recon, gaussian_kl(mu, logvar), tokens

    def forward(self, idx, targets=None):
        """(logits of the posterior mean's decoding (B, T, V), the bound per token (recon + KL) / tokens).
        Without targets the sentence is unknown: z = 0 (the prior's mean), loss None."""
        if targets is None:
            x = _index_array(idx, "idx")
            z = Tensor(backend.xp.zeros((x.shape[0], self.config.n_latent), dtype=self.wte.weight.dtype))
            return self.decode(x, z), None
        recon, kl, tokens = self.terms(idx, targets)
        return None, (recon + kl.sum()) / tokens

    def training_loss(self, batch, it: int):
        """The annealed objective (recon + beta(it) * KL with free bits) / tokens, and its terms per
        sentence for metrics.jsonl: recon (nats), kl (nats, the true KL, no floor), kl_weight."""
        from ..tasks import trim_padding
        x, y = trim_padding(batch)                                              # same loss, about half the work
        recon, kl, tokens = self.terms(x, y)
        B = kl.shape[0]
        kl_dims = kl.mean(axis=0)                                               # (D,) batch mean per dimension
        if self.config.free_bits > 0:
            floor = self.config.free_bits
            floors = Tensor(backend.xp.full(kl_dims.shape, floor, dtype=kl_dims.dtype))
            kl_dims = F.where(kl_dims.data > floor, kl_dims, floors)            # max(KL_d, floor): no gradient below
        beta = self.config.kl_weight(it)
        loss = (recon + beta * kl_dims.sum() * B) / tokens
        return loss, {"recon": recon.data / B, "kl": kl.data.sum() / B, "kl_weight": beta}

    # ------------------------------------------------------------ evaluation

    def sentence_scores(self, x, y, k: int = 1, seed: int = 0) -> dict:
        """Per sentence (host float64 arrays, (B,)): ``recon`` = -log p(x|z) at one z ~ q, ``kl``,
        ``iw_bound`` = the k-sample importance-weighted bound on -log p(x), ``tokens``; and ``mu`` (B, D).
        No dropout; the draws come from ``seed``."""
        was = self.training
        self.eval()
        try:
            with no_grad():
                x, y = _index_array(x, "idx"), _index_array(y, "targets")
                mu, logvar = self.encode(y)                                     # (B, D)
                mu_h = backend.to_numpy(mu.data).astype(np.float64)
                lv_h = backend.to_numpy(logvar.data).astype(np.float64)
                rng = np.random.default_rng(seed)
                log_w, recon_first = [], None
                for i in range(k):
                    eps = rng.standard_normal(mu_h.shape)                       # (B, D)
                    z = mu_h + np.exp(lv_h / 2) * eps
                    nll = self._sentence_nll(x, y, Tensor(backend.to_device(z, mu.dtype)))   # (B,)
                    recon_first = nll if recon_first is None else recon_first
                    log_p_z = -0.5 * (z ** 2 + math.log(2 * math.pi)).sum(axis=1)
                    log_q_z = -0.5 * (eps ** 2 + lv_h + math.log(2 * math.pi)).sum(axis=1)
                    log_w.append(-nll + log_p_z - log_q_z)
                log_w = np.stack(log_w)                                         # (k, B)
                top = log_w.max(axis=0)
                iw = -(top + np.log(np.exp(log_w - top).mean(axis=0)))          # -log mean_i w_i
                kl = 0.5 * (mu_h ** 2 + np.exp(lv_h) - lv_h - 1).sum(axis=1)
                tokens = backend.to_numpy(y != IGNORE_INDEX).sum(axis=1)
                return {"recon": recon_first, "kl": kl, "iw_bound": iw, "tokens": tokens, "mu": mu_h}
        finally:
            self.train(was)

    def _sentence_nll(self, x, y, z):
        """-log p(y | x, z) summed per sentence (B,), host float64 (no tape). The per-row log-sum-exp
        comes from the cross-entropy kernel (one fused pass over the logits)."""
        from ..kernels import cross_entropy as cross_entropy_kernel
        logits = self.decode(x, z).data                                         # (B, T, V)
        B, T, V = logits.shape
        rows, targets = logits.reshape(B * T, V), y.reshape(-1)
        _, lse = cross_entropy_kernel.forward(rows, targets, IGNORE_INDEX)      # (B T,)
        real = targets != IGNORE_INDEX
        picked = backend.xp.take_along_axis(rows, backend.xp.where(real, targets, 0)[:, None], axis=1)[:, 0]
        nll = backend.xp.where(real, lse - picked, 0.0).reshape(B, T)
        return backend.to_numpy(nll).astype(np.float64).sum(axis=1)

    # ------------------------------------------------------------ decoding: prior samples, reconstructions, homotopies

    def decoder_for(self, z) -> "ConditionedDecoder":
        return ConditionedDecoder(self, z)

    def decode_z(self, z, boundary: int, max_len: int | None = None, temperature: float = 1.0, seed: int = 0):
        """Sentences (lists of token ids, boundary cut off) decoded from z (B, D) host or device,
        by the library's sampler (``scratchlm.generate.sample_documents``; temperature 0 = greedy)."""
        from ..generate import sample_documents
        z = np.asarray(backend.to_numpy(z.data if isinstance(z, Tensor) else z), dtype=np.float64)
        return sample_documents(self.decoder_for(z), boundary, z.shape[0], max_len or self.config.block_size,
                                temperature=temperature, seed=seed)

    def sample(self, n: int, boundary: int, temperature: float = 1.0, seed: int = 0):
        """n sentences from the prior: z ~ N(0, I) (drawn from ``seed``), then decoded."""
        z = np.random.default_rng(seed).standard_normal((n, self.config.n_latent))
        return self.decode_z(z, boundary, temperature=temperature, seed=seed)

    def posterior_mean(self, y):
        with no_grad():
            mu, _ = self.encode(y)
        return backend.to_numpy(mu.data).astype(np.float64)

    def reconstruct(self, y, boundary: int):
        """Greedy decodings of the posterior means of sentences y (B, T)."""
        return self.decode_z(self.posterior_mean(y), boundary, temperature=0)

    def interpolate(self, y_pair, boundary: int, steps: int = 7):
        """The homotopy between two sentences (y_pair (2, T)): greedy decodings of
        z_t = (1 - t) mu_a + t mu_b for t = 0, 1/(steps-1), .., 1."""
        mu = self.posterior_mean(y_pair)                                        # (2, D)
        t = np.linspace(0.0, 1.0, steps)[:, None]
        return self.decode_z((1 - t) * mu[0] + t * mu[1], boundary, temperature=0)


class ConditionedDecoder:
    """The decoder with z fixed, seen as a recurrent language model (``init_state`` / ``step``), so
    ``scratchlm.generate``'s sampler decodes it like any other: the state starts at h_0(z) and z
    joins every input."""

    def __init__(self, vae: SentenceVAE, z):
        self.vae, self.config = vae, vae.config
        self.z = backend.to_device(np.asarray(z), vae.wte.weight.dtype)        # (B, D)

    @property
    def training(self):
        return self.vae.training

    def eval(self):
        self.vae.eval()
        return self

    def train(self, mode: bool = True):
        self.vae.train(mode)
        return self

    def init_state(self, batch_size: int):
        if batch_size != self.z.shape[0]:
            raise ValueError(f"the decoder holds {self.z.shape[0]} latent codes, asked for {batch_size} rows")
        with no_grad():
            h, c = self.vae.initial_state(Tensor(self.z))
        return h.data, c.data

    def step(self, token_ids, state):
        """token_ids (B,) -> (logits (B, V), new state), without the tape."""
        vae = self.vae
        h, c = state
        x = backend.xp.concatenate([vae.wte.weight.data[token_ids], self.z], axis=1)   # (B, C + D)
        out, h, c = vae.decoder.step_arrays(x, h, c)                           # (B, H)
        with no_grad():
            logits = vae.lm_head(Tensor(out))                                   # (B, V)
        return logits, (h, c)


def active_units(mu: np.ndarray, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies across the data: Var_x(mu_d) >= threshold
    (Burda et al. 2016). mu: (N, D) posterior means of N sentences."""
    return int((np.var(mu, axis=0) >= threshold).sum())


__all__ = ["VAEConfig", "SentenceVAE", "ConditionedDecoder", "active_units"]
