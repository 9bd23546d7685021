"""Model summaries as text tables: each leaf layer's output shape and parameter count (Keras's
``model.summary()``), or, for a model that cannot run a dummy input, one row per parameter."""
from __future__ import annotations

from .. import nn
from ..tensor import no_grad


def table(headers: tuple[str, str, str], rows: list[tuple[str, str, str]], footer: list[str]) -> str:
    """Three columns, the first two left-aligned and the counts right-aligned, between rules."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    rule = "=" * len(line(("", "", "")))
    return "\n".join([line(headers), rule, *map(line, rows), rule, *footer])


def layer_table(model, inputs, footer: list[str]) -> str:
    """Run ``model(inputs)`` once (eval mode, no tape) and list every leaf layer in call order with
    its output's shape and its parameters (a parameter shared by two layers, such as a tied
    embedding, counts once, at its first use, and is marked "(tied)" after)."""
    names = {id(module): name for name, module in model.named_modules()}
    rows, counted = [], set()

    def record(module, out):
        # a tuple: a recurrent layer's (output, state), or a fused residual + norm's (sum, norm),
        # both of the output's shape: the first
        out = out[0] if isinstance(out, tuple) else out
        if next(module.children(), None) is not None:
            return                                             # containers: their leaves are rows
        own = [p for _, p in module._named_parameters_all()]
        fresh = [p for p in own if id(p) not in counted]
        counted.update(id(p) for p in own)
        note = "" if len(fresh) == len(own) else " (tied)"
        rows.append((f"{names[id(module)]} ({type(module).__name__})", str(out.shape),
                     f"{sum(p.size for p in fresh):,}{note}"))

    was_training = model.training
    model.eval()
    try:
        with no_grad(), nn.record_outputs(record):
            model(inputs)
    finally:
        model.train(was_training)
    return table(("Layer (type)", "Output shape", "Params"), rows, footer)


def parameter_table(model, total: int) -> str:
    """One row per named parameter with its shape and size, then the total."""
    rows = [(name, str(tuple(p.shape)), f"{p.size:,}") for name, p in model.named_parameters()]
    return "\n".join([type(model).__name__,
                      table(("Parameter", "Shape", "Params"), rows, [f"Total params: {total:,}"])])
