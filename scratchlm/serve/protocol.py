"""The OpenAI request and response shapes: checking a request, the chat template, building replies.

No HTTP here (``app.py`` does that): a request body (a dict) becomes a ``Job`` (token ids per
prompt, the controls, what to report) or an ``ApiError`` (status, message, type, code, param);
events from the engine become response objects and stream chunks.

The chat template (``chat_prompt``) is ``scratchlm chat``'s conversation format, so a
conversation over HTTP is the same text the terminal chat builds:

    system message   ->  content + "\\n\\n"
    user message     ->  content + "\\n"           (the reply follows it)
    assistant message->  content + "\\n\\n"         (the last message, if it is the assistant's,
                                                    is left open: the reply continues it)

and a chat reply ends at a blank line or ``<|endoftext|>`` (``scratchlm.chat.REPLY_STOPS``), or
at any stop string of the request.
"""
from __future__ import annotations

import math
import secrets
import time
import uuid
from dataclasses import dataclass, field

from scratchlm.chat import REPLY_STOPS
from scratchlm.errors import UserError

MAX_LOGPROBS = 20          # alternatives per token (OpenAI: 5 for completions, 20 for chat)
MAX_N = 16                 # choices per prompt
MAX_STOPS = 4              # stop strings per request (as OpenAI)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16    # OpenAI's default for /v1/completions; chat defaults to the rest of the window


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """A checked request: what to generate and how to answer."""
    chat: bool
    prompts: list[list[int]]              # token ids of each prompt
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int = 0
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int = 0                     # alternatives per token to report (0: none)
    want_logprobs: bool = False           # report the chosen token's log-probability
    echo_texts: list[str] | None = None   # completions with echo: the prompt texts, put before the text
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


# ====================================================================== checking a request

_MISSING = object()


def _get(body: dict, name: str, kinds, default=None, what: str = ""):
    """body[name] if it is one of ``kinds`` (None counts as absent), else a 400 naming the field."""
    value = body.get(name, None)
    if value is None:
        return default
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in _as_tuple(kinds))
    if not ok:
        raise ApiError(400, f"'{name}' must be {what}, got {type(value).__name__} {_short(value)}",
                       code="invalid_type", param=name)
    return value


def _as_tuple(kinds):
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _in_range(name: str, value, ok: bool, what: str):
    if not ok:
        raise ApiError(400, f"'{name}' must be {what}, got {_short(value)}", code="invalid_value", param=name)
    return value


def _encode(tokenizer, text: str, param: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except UserError as exc:
        raise ApiError(400, f"'{param}' cannot be tokenized: {exc}", code="invalid_prompt", param=param) from None


def _completion_prompts(body: dict, tokenizer, vocab_size: int) -> tuple[list[list[int]], list[str]]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of such lists."""
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise ApiError(400, "'prompt' is required (a string, a list of strings, or token ids)",
                       code="missing_required_parameter", param="prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_int(t) for t in p)
                                                     for p in prompt):
        prompts = prompt
    else:
        raise ApiError(400, f"'prompt' must be a non-empty string, a list of strings, a list of token ids or a "
                       f"list of such lists, got {_short(prompt)}", code="invalid_type", param="prompt")
    ids, texts = [], []
    for p in prompts:
        if isinstance(p, str):
            tokens, text = _encode(tokenizer, p, "prompt"), p
        else:
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise ApiError(400, f"'prompt' token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                               code="invalid_value", param="prompt")
            tokens, text = list(p), tokenizer.decode(p)
        if not tokens:
            raise ApiError(400, "'prompt' is empty: give at least one character (or token) to continue",
                           code="empty_prompt", param="prompt")
        ids.append(tokens)
        texts.append(text)
    return ids, texts


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chat_prompt(messages) -> str:
    """The conversation as the text the model continues (see the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects",
                       code="invalid_type" if not isinstance(messages, list) else "empty_prompt", param="messages")
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", code="invalid_type",
                           param=f"messages[{i}]")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be 'system', 'user' or 'assistant', got {_short(role)}",
                           code="invalid_value", param=f"messages[{i}].role")
        content = _content_text(content, i)
        last = i == len(messages) - 1
        if role in ("system", "developer"):
            parts.append(content + "\n\n")
        elif role == "user":
            parts.append(content + "\n")
        else:
            parts.append(content if last else content + "\n\n")
    text = "".join(parts)
    if not text.strip("\n"):
        raise ApiError(400, "'messages' hold no text: give at least one non-empty message", code="empty_prompt",
                       param="messages")
    return text


def _content_text(content, i: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts, got {_short(content)}",
                   code="invalid_type", param=f"messages[{i}].content")


_UNSUPPORTED = {   # field -> the values that mean "not used", which are all we can honour
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "suffix": ("",),
    "tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
}


def parse_job(body, tokenizer, block_size: int, chat: bool) -> Job:
    """Check an OpenAI completions (``chat=False``) or chat completions request; a ``Job`` or ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_type")
    for name, neutral in _UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise ApiError(400, f"'{name}' is not supported by this server; leave it out", code="unsupported",
                           param=name)
    _get(body, "model", str, what="a string")
    vocab_size = tokenizer.vocab_size
    if chat:
        text = chat_prompt(body.get("messages"))
        prompts, texts = [_encode(tokenizer, text, "messages")], [text]
    else:
        prompts, texts = _completion_prompts(body, tokenizer, vocab_size)

    n = _get(body, "n", int, 1, "an integer")
    _in_range("n", n, 1 <= n <= MAX_N, f"an integer in [1, {MAX_N}]")
    best_of = _get(body, "best_of", int, n, "an integer")
    _in_range("best_of", best_of, best_of == n, "equal to n (this server returns every choice it samples)")
    temperature = _get(body, "temperature", (int, float), 1.0, "a number")
    _in_range("temperature", temperature, 0 <= temperature <= 2, "a number in [0, 2] (0 = greedy)")
    top_p = _get(body, "top_p", (int, float), None, "a number")
    if top_p is not None:
        _in_range("top_p", top_p, 0 < top_p <= 1, "a number in (0, 1]")
    top_k = _get(body, "top_k", int, None, "an integer")            # an extension: 0 or None = off
    if top_k is not None:
        _in_range("top_k", top_k, top_k >= 0, "an integer >= 0 (0 = off)")
    penalty = _get(body, "repetition_penalty", (int, float), 1.0, "a number")   # an extension
    _in_range("repetition_penalty", penalty, 0 < penalty < math.inf, "a finite number > 0 (1 = off)")
    seed = _get(body, "seed", int, None, "an integer")
    if seed is not None:
        _in_range("seed", seed, 0 <= seed < 2 ** 63, "an integer >= 0")
    else:
        seed = secrets.randbelow(2 ** 31)
    stream = _get(body, "stream", bool, False, "true or false")
    options = _get(body, "stream_options", dict, {}, "an object")
    include_usage = _get(options, "include_usage", bool, False, "true or false")
    stops = _stops(body)

    longest = max(len(p) for p in prompts)
    room = block_size - longest
    max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    default = max(room, 1) if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
    max_tokens = _get(body, max_key, int, default, "an integer")
    _in_range(max_key, max_tokens, max_tokens >= 1, "an integer >= 1")
    if longest + max_tokens > block_size:
        raise ApiError(400, f"this model's context is {block_size} tokens; the prompt has {longest} and "
                       f"{max_key} asks for {max_tokens} more: ask for at most {max(room, 0)}"
                       + ("" if room > 0 else ", i.e. shorten the prompt"),
                       code="context_length_exceeded", param=max_key)

    job = Job(chat=chat, prompts=prompts, max_tokens=max_tokens, n=n, temperature=float(temperature),
              top_p=top_p, top_k=top_k, repetition_penalty=float(penalty), seed=seed, stream=stream,
              include_usage=include_usage, stops=stops + (list(REPLY_STOPS) if chat else []))
    if chat:
        job.want_logprobs = _get(body, "logprobs", bool, False, "true or false")
        job.logprobs = _get(body, "top_logprobs", int, 0, "an integer")
        _in_range("top_logprobs", job.logprobs, 0 <= job.logprobs <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]")
        if job.logprobs and not job.want_logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", code="invalid_value", param="top_logprobs")
    else:
        logprobs = _get(body, "logprobs", int, None, "an integer")
        if logprobs is not None:
            _in_range("logprobs", logprobs, 0 <= logprobs <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]")
            job.want_logprobs, job.logprobs = True, logprobs
        if _get(body, "echo", bool, False, "true or false"):
            job.echo_texts = texts
    return job


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them, got "
                       f"{_short(stop)}", code="invalid_type", param="stop")
    return stops


# ====================================================================== building replies

def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token as text (bytes that are not whole UTF-8 characters as "bytes:\\xNN...") and its bytes."""
    if hasattr(tokenizer, "decode_bytes"):
        data = tokenizer.decode_bytes([token])
        try:
            return data.decode("utf-8"), list(data)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data), list(data)
    text = tokenizer.decode([token])
    return text, list(text.encode("utf-8"))


class Choice:
    """What one choice has produced so far (text, tokens and log-probabilities, finish reason)."""

    def __init__(self, index: int, prefix: str = ""):
        self.index, self.text, self.finish_reason, self.tokens = index, prefix, None, 0
        self.logprob_items = []            # per token: (token, logprob, top [(token, logprob)], text offset)

    def add(self, event) -> None:
        if event.kind == "token" and event.logprob is not None:
            self.logprob_items.append((event.token, event.logprob, event.top, len(self.text)))
        self.text += event.text
        if event.kind == "done":
            self.finish_reason, self.tokens = event.finish_reason, event.completion_tokens


def logprobs_object(job: Job, tokenizer, items) -> dict | None:
    """OpenAI's logprobs for the given (token, logprob, top, offset) items, in the endpoint's shape."""
    if not job.want_logprobs:
        return None
    if job.chat:
        def entry(token, logprob):
            text, data = token_text(tokenizer, token)
            return {"token": text, "logprob": logprob, "bytes": data}
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in (top or [])[:job.logprobs]]}
                            for t, lp, top, _ in items]}
    return {"tokens": [token_text(tokenizer, t)[0] for t, _, _, _ in items],
            "token_logprobs": [lp for _, lp, _, _ in items],
            "top_logprobs": [{token_text(tokenizer, a)[0]: alp for a, alp in (top or [])[:job.logprobs]}
                             for _, _, top, _ in items],
            "text_offset": [offset for _, _, _, offset in items]}


def usage(job: Job, completion_tokens: int) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens}


def response_object(job: Job, model_name: str, choices: list[Choice], tokenizer) -> dict:
    """The whole (non-streamed) reply."""
    if job.chat:
        items = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                  "logprobs": logprobs_object(job, tokenizer, c.logprob_items), "finish_reason": c.finish_reason}
                 for c in choices]
    else:
        items = [{"index": c.index, "text": c.text, "logprobs": logprobs_object(job, tokenizer, c.logprob_items),
                  "finish_reason": c.finish_reason} for c in choices]
    return {"id": _id(job), "object": "chat.completion" if job.chat else "text_completion", "created": job.created,
            "model": model_name, "system_fingerprint": None, "choices": items,
            "usage": usage(job, sum(c.tokens for c in choices))}


def chunk_object(job: Job, model_name: str, index: int, text: str | None, finish_reason=None, logprob_items=None,
                 tokenizer=None, role: bool = False) -> dict:
    """One streamed chunk for choice ``index``."""
    logprobs = logprobs_object(job, tokenizer, logprob_items) if logprob_items else None
    if job.chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": _id(job), "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": job.created, "model": model_name, "system_fingerprint": None, "choices": [choice]}


def usage_chunk(job: Job, model_name: str, completion_tokens: int) -> dict:
    """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
    return {"id": _id(job), "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": job.created, "model": model_name, "system_fingerprint": None, "choices": [],
            "usage": usage(job, completion_tokens)}


def _id(job: Job) -> str:
    return ("chatcmpl-" if job.chat else "cmpl-") + job.id
