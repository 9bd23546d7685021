"""``scratchlm attention``: draw the attention of every head of one layer as a grid of heatmaps.

    scratchlm attention --run runs/enfr --text "I am tired." --out maps.png [--layer L]
    scratchlm attention --run runs/nano --text "ROMEO:" --out maps.png             # a GPT run

For a translation run (seq2seq): the model translates ``--text`` greedily, and each panel is one
head's cross-attention of decoder layer L: a row per target token produced (the token predicted
from that step's query), a column per source token, each row summing to 1. For a GPT run: each
panel is one head's causal self-attention of block L over the tokens of ``--text``. One PNG.
"""
from __future__ import annotations

import sys

import numpy as np

from scratchlm.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("attention", help="draw a layer's attention heads (seq2seq cross-attention, GPT "
                                                "self-attention) for a text",
                              description="One image: a heatmap per head of --layer (default: the last).")
    p.add_argument("--run", required=True, metavar="DIR", help="a seq2seq or GPT run folder")
    p.add_argument("--text", required=True, help="the sentence to translate (seq2seq) or read (GPT)")
    p.add_argument("--out", required=True, metavar="PNG", help="the image file to write")
    p.add_argument("--layer", type=int, metavar="L", help="which layer, from 0 (default: the last)")
    p.set_defaults(func=cmd_attention)


def _label(unit: str) -> str:
    return {" ": "␣", "\n": "⏎", "\t": "⇥"}.get(unit, unit.replace(" ", "␣"))


def _layer(layer, count: int) -> int:
    layer = count - 1 if layer is None else layer
    if not 0 <= layer < count:
        raise UserError(f"--layer must be between 0 and {count - 1} (the model has {count} layers), got {layer}")
    return layer


def seq2seq_maps(model, vocab, text: str, layer=None):
    """(weights (H, T, S), source labels, target labels, title) of a translation of ``text``."""
    from scratchlm.commands.translate import prepare_sources
    from scratchlm.translate import greedy_search
    layer = _layer(layer, model.config.num_decoder_layers)
    ids = prepare_sources(vocab, model.config.max_len, [text], lambda m: print(m, file=sys.stderr))[0]
    hyps, weights = greedy_search(model, np.asarray([ids]), keep_weights=True)
    out = hyps[0]
    produced = out + ([2] if len(out) < weights[layer].shape[2] else [])        # the steps run, </s> included
    w = weights[layer][0, :, :len(produced), :]                                 # (H, T, S)
    src_labels = [_label(vocab.decode([i])) for i in ids[:-1]] + ["</s>"]
    tgt_labels = [_label(vocab.decode([i])) if i != 2 else "</s>" for i in produced]
    return w, src_labels, tgt_labels, f"cross-attention, decoder layer {layer}: {text!r} -> {vocab.decode(out)!r}"


def gpt_maps(model, tokenizer, text: str, layer=None):
    """(weights (H, T, T), labels, labels, title): causal self-attention of block L over ``text``."""
    from scratchlm import backend
    from scratchlm.nn import functional as F
    from scratchlm.tensor import no_grad
    blocks = model.transformer.h
    layer = _layer(layer, len(blocks))
    ids = tokenizer.encode(text)[-model.config.block_size:]
    if not ids:
        raise UserError("--text is empty; give the text whose attention to draw")
    with no_grad():
        idx = backend.to_device(np.asarray([ids], dtype=np.int64))
        tok = model.transformer.wte(idx)
        pos = backend.xp.arange(len(ids))
        x = tok + (model.transformer.wpe(pos) if "wpe" in model.transformer else model.transformer.sinusoidal(pos))
        for block in list(blocks)[:layer]:
            x = block(x)
        attn = blocks[layer].attn
        B, T, C = x.shape
        H = attn.n_head
        q, k, v = F.split(attn.c_attn(blocks[layer].ln_1(x)), 3, axis=2)
        q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        _, weights = F.scaled_dot_product_attention(q, k, v, causal=True, need_weights=True)
    labels = [_label(tokenizer.decode([i])) for i in ids]
    return backend.to_numpy(weights.data)[0], labels, labels, f"self-attention, block {layer}: {text!r}"


def draw(weights, x_labels, y_labels, title: str, path, x_name: str, y_name: str) -> None:
    """A grid of heatmaps, one per head (weights (H, rows, cols)), labelled, into one PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("drawing needs matplotlib: pip install 'scratchlm[plot]'") from None
    H, rows, cols = weights.shape
    ncols = min(H, 4)
    nrows = -(-H // ncols)
    cell = 0.28
    width = max(3.0, cols * cell + 1.2)
    height = max(2.5, rows * cell + 1.2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.6), squeeze=False)
    for h in range(nrows * ncols):
        ax = axes[h // ncols][h % ncols]
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(cols))
        ax.set_xticklabels(x_labels, fontsize=8, rotation=90 if max(map(len, x_labels)) > 2 else 0)
        ax.set_yticks(range(rows))
        ax.set_yticklabels(y_labels, fontsize=8)
        ax.set_title(f"head {h}", fontsize=10)
        ax.set_xlabel(x_name, fontsize=8)
        ax.set_ylabel(y_name, fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_attention(args) -> int:
    from pathlib import Path

    from scratchlm import backend
    from scratchlm.runs import load_model, read_run_config
    backend.use_backend("numpy")
    if not args.text.strip():
        raise UserError("--text is empty; give the sentence whose attention to draw")
    if Path(args.out).suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {args.out!r}")
    family = read_run_config(args.run).get("model")
    model, tokenizer, _ = load_model(args.run)
    if family == "seq2seq":
        weights, src, tgt, title = seq2seq_maps(model, tokenizer, args.text, args.layer)
        draw(weights, src, tgt, title, args.out, "source", "target (produced)")
    elif family in ("gpt", None) or isinstance(family, dict):
        weights, labels, _, title = gpt_maps(model, tokenizer, args.text, args.layer)
        draw(weights, labels, labels, title, args.out, "key (attended to)", "query")
    else:
        raise UserError(f"{args.run} holds a {family} model, which has no attention; use a seq2seq or GPT run")
    print(f"wrote {args.out} ({weights.shape[0]} heads)")
    return 0
