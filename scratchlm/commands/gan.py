"""``scratchlm gan``: train a text GAN (SeqGAN, scratchlm.models.gan) and sample from it.

    scratchlm gan --corpus coco --out runs/gan [--set g_pretrain_iters=2000 --set rollouts=4 ...]
    scratchlm gan --run runs/gan --sample 10

Training is ``scratchlm train --model gan``: one Trainer run whose iterations are, in turn, the
generator's maximum-likelihood pretraining, the discriminator's pretraining and the adversarial
updates (metrics.jsonl: ``phase`` 0/1/2, ``d_loss``, ``d_accuracy``, ``reward``). At the end it
writes DIR/samples.txt (1,000 samples) and DIR/eval.json: the generator's test NLL per token
(it is a language model, so the likelihood is exact) and the samples' BLEU-2..5 / self-BLEU-2..5.
"""
from __future__ import annotations

import sys
import time

from scratchlm.commands import textgen
from scratchlm.errors import UserError

USES = ("--sample N",)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "gan", help="train a text GAN (--corpus coco --out DIR) or sample from one (--run DIR --sample N)",
        description="Train SeqGAN (an LSTM generator, a CNN discriminator, policy gradient with Monte-Carlo "
                    "rollouts) with the shared trainer, or sample sentences from a trained run.")
    textgen.add_training_arguments(p, "gan", "train: a registered corpus (coco) or a file, one sentence a line")
    p.add_argument("--run", metavar="DIR", help="use the GAN in DIR")
    p.add_argument("--sample", type=int, metavar="N", help="print N sentences from the generator")
    p.add_argument("--temperature", type=float, default=1.0, help="--sample: softmax temperature (default 1)")
    p.set_defaults(func=cmd_gan)


def cmd_gan(args) -> int:
    mode = textgen.check_mode(args, "gan", USES)
    if mode == "train":
        run_dir = textgen.train(args, "gan")
        report = write_lm_report(run_dir, "gan", seed=args.seed)
        print(f"test: generator NLL {report['nll']:.4f}/token (perplexity {report['perplexity']:.1f}), BLEU-4 "
              f"{report['bleu4']:.3f}, self-BLEU-4 {report['self_bleu4']:.3f}; wrote {run_dir}/eval.json, samples.txt")
        return 0
    if args.sample is None:
        raise UserError("with --run give --sample N")
    if args.sample < 1:
        raise UserError(f"--sample needs a positive number of sentences, got {args.sample}")
    model, tokenizer, header = textgen.load_run(args.run, "gan")
    for line in lm_samples(model, tokenizer, header, args.sample, args.temperature, args.seed):
        sys.stdout.write(line + "\n")
    return 0


def lm_samples(model, tokenizer, header, n: int, temperature: float = 1.0, seed: int = 0) -> list[str]:
    """n sentences from a recurrent LM run (a GAN's generator, an LSTM LM), each from the boundary to the next."""
    from scratchlm.generate import sample_documents
    T = int(header["train"].get("block_size", 64))
    rows = sample_documents(model, textgen.boundary_id(tokenizer), n, T, temperature=temperature, seed=seed)
    return [tokenizer.decode(ids) for ids in rows]


def write_lm_report(run_dir, family: str, temperature: float = 1.0, seed: int = 0) -> dict:
    """eval.json's test entry for a language-model run: exact test NLL per token, perplexity, and
    the 1,000 samples' scores (samples.txt)."""
    from scratchlm.evaluate import evaluate_run
    started = time.perf_counter()
    model, tokenizer, header = textgen.load_run(run_dir, family)
    scored = evaluate_run(run_dir, split="test", write=False)
    references = textgen.test_sentences(header)
    samples = lm_samples(model, tokenizer, header, textgen.N_SAMPLES, temperature, seed)
    report = {"nll": scored["loss"], "perplexity": scored["perplexity"], "tokens": scored["tokens"],
              "temperature": temperature, **textgen.sample_scores(samples, references)}
    report["eval_seconds"] = time.perf_counter() - started
    textgen.write_report(run_dir, report, samples)
    return report
