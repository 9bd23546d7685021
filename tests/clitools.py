"""What the command-line tests share: running ``python -m scratchlm`` on this checkout, the check
that a user's mistake ends in one clear line with exit status 2, and a small word corpus."""
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS_WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in old trees".split()


def cli(*args, cwd=None, env_extra=None, stdin=None, timeout=300):
    """``scratchlm ARGS...`` in a child process importing this checkout; the finished process."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "scratchlm", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, input=stdin, timeout=timeout)


def assert_one_line_error(result, *fragments):
    """Exit status 2, no traceback, one line ``scratchlm: error: ...`` on stderr holding each fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("scratchlm: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def write_word_corpus(path, seed: int = 0, words: int = 800):
    """``words`` words drawn (seeded) from a 16-word vocabulary, on one line: a corpus a tiny model
    fits in a few steps."""
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(CORPUS_WORDS) for _ in range(words)) + "\n", encoding="utf-8")
    return path
