"""What a training run reports as it goes: a line per iteration in DIR/metrics.jsonl, a progress bar
on a terminal (or a log line every ``log_interval`` iterations elsewhere), an eval line, the loss
plot at the end, and the model FLOPs utilisation (MFU) when the device's peak is known.

The Trainer (``scratchlm.train``) decides what happened; this module only writes it down, so the
loop reads as the algorithm and the formatting lives in one place.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from scratchlm import backend


def peak_flops() -> float | None:
    """Peak FLOP/s of the device, for MFU: $SCRATCHLM_PEAK_FLOPS, else a table of NVIDIA GPUs, else None.

    GPU peaks are dense float32 (or TF32 tensor-core when CUPY_TF32=1). A CPU's peak depends on
    its vector units and clocks, which we cannot read portably: set SCRATCHLM_PEAK_FLOPS for MFU.
    """
    if os.environ.get("SCRATCHLM_PEAK_FLOPS"):
        return float(os.environ["SCRATCHLM_PEAK_FLOPS"])
    if not backend.is_gpu():
        return None
    name = backend.xp.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    tf32 = os.environ.get("CUPY_TF32") == "1"
    table = [("H100 PCIe", 51e12, 378e12), ("H100", 67e12, 495e12), ("H200", 67e12, 495e12),
             ("A100", 19.5e12, 156e12), ("L4", 30e12, 60e12), ("A10", 31e12, 62e12)]
    for key, fp32, tf32_peak in table:
        if key in name:
            return tf32_peak if tf32 else fp32
    return None


class RunLog:
    """metrics.jsonl, the progress bar or log lines, and the loss plot of one run (rank 0's).

    ``progress``: True/False forces the bar on/off; None shows it on a terminal and prints a line
    every ``log_interval`` iterations otherwise. ``print_line`` is where lines go (``print``).
    """

    def __init__(self, run_dir, config, progress, print_line, tokens_per_iter: int, flops_per_iter: float):
        self.run_dir, self.config, self.progress, self.print_line = Path(run_dir), config, progress, print_line
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tokens_per_iter, self.flops_per_iter, self.peak = tokens_per_iter, flops_per_iter, peak_flops()
        self.bar = None

    def start(self, iteration: int) -> None:
        if self.progress is False:
            return
        from tqdm import tqdm
        # disable=None: no bar when stderr is not a terminal (logs, CI); lines are printed instead
        bar = tqdm(total=self.config.max_iters, initial=iteration, unit="it", dynamic_ncols=True,
                   disable=None if self.progress is None else False)
        self.bar = None if bar.disable else bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def write(self, record: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, it, loss, grad_norm, lr, seconds, terms=None) -> None:
        """One training iteration: its metrics line, and the bar (or every log_interval, a line)."""
        tokens_per_s = self.tokens_per_iter / seconds
        mfu = self.flops_per_iter / seconds / self.peak if self.peak else None
        self.write({"kind": "train", "iter": it, "train_loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "ms_per_iter": 1000 * seconds, "tokens_per_s": tokens_per_s, "mfu": mfu, **(terms or {})})
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        elif it % self.config.log_interval == 0 and self.progress is None:
            mfu_text = f", mfu {100 * mfu:.1f}%" if mfu is not None else ""
            self.print_line(f"iter {it}: loss {loss:.4f}, lr {lr:.2e}, {1000 * seconds:.1f} ms/iter, "
                            f"{tokens_per_s:,.0f} tok/s{mfu_text}")

    def eval(self, it, losses: dict, lr: float) -> None:
        """An evaluation: train and val loss (and a task's extra figures, e.g. dev BLEU)."""
        val = losses["val"]
        extra = {k: v for k, v in losses.items() if k not in ("train", "val")}
        self.write({"kind": "eval", "iter": it, "train_loss": losses["train"], "val_loss": val,
                    "perplexity": math.exp(min(val, 700.0)), "lr": lr, **extra})
        message = f"iter {it:>5}: train loss {losses['train']:.4f}, val loss {val:.4f}" + \
            "".join(f", {k.replace('_', ' ')} {v:.4f}" for k, v in extra.items() if k != "selection_score")
        if self.bar is not None:
            self.bar.write(message)
        elif self.progress is not False:
            self.print_line(message)

    def plot(self) -> None:
        from scratchlm.runs import plot_losses
        note = plot_losses(self.run_dir)
        if self.progress is not False:
            self.print_line(note)
