"""scratchlm.chat: the conversation logic, then the real program driven through piped stdin and
through a pseudo-terminal (commands, Ctrl-C in the middle of a reply, Ctrl-D).

Oracles: replies equal ``stream_text`` on the documented context format with the documented seed
rule; the exit status; what reaches the terminal.
"""
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scratchlm import backend
from scratchlm.chat import REPLY_STOPS, ChatSession, CommandError, QuitChat, one_line
from scratchlm.checkpoint import save_safetensors
from scratchlm.generate import stream_text
from scratchlm.models import GPT
from scratchlm.tokenizers import CharTokenizer
from scratchlm.config import TrainConfig
from scratchlm.runs import load_model, write_run_header

REPO = Path(__file__).resolve().parents[1]
ALPHABET = list("\n !.?abcdefghijklmnopqrstuvwxyz")


def make_run(run_dir: Path, never_newline: bool = False) -> None:
    """A run folder as ``scratchlm train`` leaves it (config, tokenizer, weights), random weights.

    ``never_newline``: make "\\n" impossible to sample (its output row points against a large
    final-LayerNorm bias), so replies never end at a blank line and only Ctrl-C or max tokens
    stop them."""
    tokenizer = CharTokenizer(ALPHABET)
    config = TrainConfig(block_size=32, n_layer=1, n_head=2, n_embd=16).validate()
    model = GPT(config.model_config(tokenizer.vocab_size), seed=0)
    if never_newline:
        bias = np.full(16, 3.0)
        model.transformer.ln_f.bias.data[...] = backend.to_device(bias)
        model.transformer.wte.weight.data[tokenizer.encode("\n")[0]] = backend.to_device(-bias)
    write_run_header(run_dir, config, model.config, tokenizer, {"corpus": "test"})
    save_safetensors(run_dir / "model.safetensors", model.state_dict(), metadata={"iteration": "0"})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_run")
    make_run(path)
    return path


@pytest.fixture(scope="module")
def endless_run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("endless_run")
    make_run(path, never_newline=True)
    return path


def chat_command(run, *options):
    return [sys.executable, "-m", "scratchlm.chat", "--run", str(run), *options]


def child_env():
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------- the session, in-process

def test_replies_follow_the_documented_format_and_seed_rule(run_dir):
    model, tokenizer, _ = load_model(run_dir)
    session = ChatSession(model, tokenizer, temperature=1.0, top_k=None, seed=5, max_new_tokens=12)
    first = "".join(session.reply("hello"))
    second = "".join(session.reply("how are you?"))
    controls = dict(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, max_new_tokens=12,
                    stop=REPLY_STOPS)
    expected_first = "".join(stream_text(model, tokenizer, "hello\n", seed=5, **controls))
    context = "hello\n" + expected_first + "\n\n" + "how are you?\n"
    ids = tokenizer.encode(context)[-session.context_limit():]
    expected_second = "".join(stream_text(model, tokenizer, ids, seed=6, **controls))
    assert (first, second) == (expected_first, expected_second)
    assert session.history == context + second + "\n\n"


def test_context_is_trimmed_oldest_first(run_dir):
    model, tokenizer, _ = load_model(run_dir)
    session = ChatSession(model, tokenizer, max_new_tokens=10)
    assert session.context_limit() == 32 - 10
    session.history = "abcdefghijklmnopqrstuvwxyz" * 2
    assert tokenizer.decode(session.context_ids(session.history)) == session.history[-22:]
    assert "22 of 22 tokens" in session.command("/context")
    session.command("/reset")
    assert session.history == "" and "0 of 22" in session.command("/context")


def test_commands_change_the_controls_and_refuse_bad_values(run_dir):
    model, tokenizer, _ = load_model(run_dir)
    session = ChatSession(model, tokenizer)
    session.command("/temp 0")
    session.command("/topk 5")
    session.command("/topp 0.5")
    session.command("/max 7")
    session.command("/seed 9")
    assert session.controls == dict(temperature=0.0, top_k=5, top_p=0.5, repetition_penalty=1.0, max_new_tokens=7)
    assert session.seed == 9
    assert "/temp" in session.command("/help") and "/quit" in session.command("/help")
    # errors name the command the user typed, not the Python parameter
    for bad, needle in [("/temp -1", "/temp must be"), ("/temp hot", "number"), ("/topk 1.5", "integer"),
                        ("/topp 0", "/topp must be"), ("/max 0", ">= 1"), ("/seed -3", "/seed must be"),
                        ("/tmep 1", "/help")]:
        with pytest.raises(CommandError, match=needle) as info:
            session.command(bad)
        assert "\n" not in str(info.value)
    assert session.controls["temperature"] == 0.0                  # a refused value changes nothing
    with pytest.raises(QuitChat):
        session.command("/quit")


# ---------------------------------------------------------------------- piped stdin

def test_piped_session_one_reply_per_line(run_dir):
    script = "hello there\n/temp 0\n/max 6\n/context\nwhat now?\n/bogus\nand then\n"
    result = subprocess.run(chat_command(run_dir, "--max-new-tokens", "10", "--seed", "3"), input=script,
                            capture_output=True, text=True, env=child_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    # stdout holds only the replies; compute them with the session logic in-process
    model, tokenizer, _ = load_model(run_dir)
    session = ChatSession(model, tokenizer, max_new_tokens=10, seed=3)
    expected = ["".join(session.reply("hello there"))]
    session.command("/temp 0")
    session.command("/max 6")
    expected += ["".join(session.reply("what now?")), "".join(session.reply("and then"))]
    assert result.stdout == "".join(one_line(reply) + "\n" for reply in expected)
    notes = result.stderr.splitlines()
    assert notes[:2] == ["temperature = 0.0", "max_new_tokens = 6"]
    assert notes[2].startswith("context: ") and "unknown command '/bogus'" in notes[3]
    assert "you>" not in result.stdout + result.stderr                # no prompt decoration


def test_piped_session_notes_unknown_characters_and_quits(run_dir):
    result = subprocess.run(chat_command(run_dir, "--max-new-tokens", "4"), input="HELLO\n/quit\nnever read\n",
                            capture_output=True, text=True, env=child_env(), timeout=120)
    assert result.returncode == 0
    assert result.stdout == "\n"                                    # its (empty) reply line
    assert "'H'" in result.stderr and "vocabulary" in result.stderr


def test_piped_replies_stay_aligned_and_errors_point_into_the_typed_line(run_dir):
    """Item 12: k non-command lines -> exactly k reply lines, even when one is refused (a
    character outside the vocabulary) and replies contain newlines; the error's position is
    counted in the line typed, not in the conversation before it."""
    lines = ["hello there", "ab X", "what now?", "and then"]                # 'X' is not in ALPHABET
    result = subprocess.run(chat_command(run_dir, "--max-new-tokens", "12", "--seed", "5"),
                            input="".join(line + "\n" for line in lines), capture_output=True, text=True,
                            env=child_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    replies = result.stdout.split("\n")
    assert replies[-1] == "" and len(replies) - 1 == len(lines)             # one line per line typed
    assert replies[1] == ""                                                 # the refused line's reply
    assert "'X'" in result.stderr and "position 3" in result.stderr         # 'ab X': X is at 3
    model, tokenizer, _ = load_model(run_dir)
    session = ChatSession(model, tokenizer, max_new_tokens=12, seed=5)
    expected = ["".join(session.reply(line)) for line in lines if "X" not in line]
    assert [r for k, r in enumerate(replies[:-1]) if k != 1] == [one_line(r) for r in expected]


def test_chat_max_new_tokens_zero_is_refused_like_max_zero(run_dir):
    result = subprocess.run([sys.executable, "-m", "scratchlm", "chat", "--run", str(run_dir), "--max-new-tokens", "0"],
                            input="hi\n", capture_output=True, text=True, env=child_env(), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "--max-new-tokens must be an integer >= 1" in result.stderr


def test_a_missing_run_is_one_line_and_status_2(tmp_path):
    result = subprocess.run(chat_command(tmp_path / "nope"), input="", capture_output=True, text=True,
                            env=child_env(), timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr


# ---------------------------------------------------------------------- a real terminal

class Terminal:
    """A child process on a pseudo-terminal: what it prints is read with timeouts."""

    def __init__(self, argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:                                   # the child: the pty is its terminal
            # a foreground job's Ctrl-C: the default disposition, even when this test runs in a
            # background job (which ignores SIGINT, and a program rightly keeps an ignored SIGINT)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(argv[0], argv, child_env())
        self.output = b""

    def read_until(self, needle: bytes, timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {needle!r} within {timeout} s; the terminal shows {self.output[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:                             # the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the program ended before {needle!r}: {self.output[-500:]!r}")
                self.output += chunk
        start = self.output.index(needle) + len(needle)
        seen, self.output = self.output[:start], self.output[start:]
        return seen

    def read_bytes(self, count: int, timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.output) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"fewer than {count} bytes within {timeout} s: {self.output!r}")
            if select.select([self.fd], [], [], remaining)[0]:
                self.output += os.read(self.fd, 4096)
        seen, self.output = self.output[:count], self.output[count:]
        return seen

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:                                            # keep draining so the child never blocks
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.output += os.read(self.fd, 4096)
            except OSError:
                time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the program did not exit")

    def close(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_terminal_session_commands_ctrl_c_and_ctrl_d(endless_run_dir):
    term = Terminal(chat_command(endless_run_dir, "--max-new-tokens", "8", "--seed", "1"))
    try:
        assert b"/help for commands" in term.read_until(b"you> ")
        term.send(b"/help\r")
        assert b"/topk K" in term.read_until(b"you> ")
        term.send(b"/temp 1.5\r")
        assert b"temperature = 1.5" in term.read_until(b"you> ")
        term.send(b"/nonsense\r")
        assert b"unknown command" in term.read_until(b"you> ")
        term.send(b"hello\r")                               # a short reply: 8 tokens, then the prompt
        term.read_until(b"you> ")
        term.send(b"/max 1000000\r")                        # a reply that would run for minutes
        term.read_until(b"you> ")
        term.send(b"tell me everything\r")
        term.read_until(b"tell me everything\r\n")          # the echo of the line
        term.read_bytes(20)                                 # the reply is streaming
        term.send(b"\x03")                                  # Ctrl-C: stops the reply, not the program
        assert b"[stopped]" in term.read_until(b"you> ", timeout=30)
        term.send(b"/context\r")
        assert b"context: " in term.read_until(b"you> ")
        # Ctrl-C at the prompt: a hint, still running. Wait until input() blocks in its read: CPython
        # notices a signal that lands between writing the prompt and that read only once the read
        # returns (a person is never that fast; a test is).
        time.sleep(0.5)
        term.send(b"\x03")
        assert b"Ctrl-D" in term.read_until(b"you> ")
        term.send(b"\x04")                                  # Ctrl-D on an empty line: leave
        assert term.wait() == 0
    finally:
        term.close()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_terminal_quit_command_exits_zero(run_dir):
    term = Terminal(chat_command(run_dir))
    try:
        term.read_until(b"you> ")
        term.send(b"/quit\r")
        assert term.wait() == 0
    finally:
        term.close()
