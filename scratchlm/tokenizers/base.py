"""What every tokenizer shares: the JSON file format, atomic saving, and loading by "type".

A tokenizer file is one JSON object with at least ``"type"`` (which class reads it) and
``"version"`` (of that class's layout). Loading checks both before trusting anything else, so a
file from another tool or a newer scratchlm fails with one clear line instead of a KeyError.
"""
from __future__ import annotations

import json
from pathlib import Path

from scratchlm.errors import UserError

# type name -> class with a ``from_dict`` classmethod; filled by each tokenizer module.
_REGISTRY: dict[str, type] = {}


def register(type_name: str):
    """Class decorator: ``from_dict({"type": type_name, ...})`` builds this class."""
    def wrap(cls):
        _REGISTRY[type_name] = cls
        cls.type_name = type_name
        return cls
    return wrap


def boundary_id(tokenizer, boundary: str = "\n") -> int:
    """The one token that frames documents (one per line: names, coco): the id of ``boundary`` when
    the tokenizer has it as one token (char and BPE: the newline); a tokenizer that drops whitespace
    (word) uses its ``<pad>`` (id 0) instead, which its decoding skips. One clear line otherwise."""
    ids = tokenizer.encode(boundary)
    if not ids and hasattr(tokenizer, "pad_id"):
        return int(tokenizer.pad_id)
    if len(ids) != 1:
        raise UserError(f"the tokenizer encodes the document boundary {boundary!r} as {len(ids)} tokens; "
                        f"use a tokenizer that has it as one token (char or bpe)")
    return int(ids[0])


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old file or the new one
    (``scratchlm.checkpoint.atomic_write_bytes``: temp file, fsync, rename; the user's umask)."""
    from scratchlm.checkpoint import atomic_write_bytes
    atomic_write_bytes(path, text.encode("utf-8"))


class Tokenizer:
    """Interface: ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, JSON."""

    type_name = "abstract"
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def save(self, path) -> None:
        """Write the tokenizer as indented JSON (readable merges), atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")

    def __len__(self) -> int:
        return self.vocab_size


def check_header(d, type_name: str, version: int) -> None:
    """Refuse a dict that is not a ``type_name`` tokenizer of layout ``version``."""
    if not isinstance(d, dict):
        raise UserError(f"tokenizer data must be a JSON object, got {type(d).__name__}")
    if d.get("type") != type_name:
        raise UserError(f"tokenizer data has type {d.get('type')!r}, expected {type_name!r}")
    if d.get("version") != version:
        raise UserError(
            f"{type_name} tokenizer has version {d.get('version')!r}; this scratchlm reads version "
            f"{version} (retrain the tokenizer or use a matching scratchlm)")


def from_dict(d) -> Tokenizer:
    """Rebuild a tokenizer from its ``to_dict()`` form, dispatching on ``d["type"]``."""
    if not isinstance(d, dict) or "type" not in d:
        raise UserError("tokenizer data is not a JSON object with a \"type\" field; "
                        "is this a scratchlm tokenizer.json?")
    cls = _REGISTRY.get(d["type"])
    if cls is None:
        raise UserError(f"unknown tokenizer type {d['type']!r}; known types: {sorted(_REGISTRY)}")
    return cls.from_dict(d)


def load(path) -> Tokenizer:
    """Read a tokenizer JSON file written by ``save``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"tokenizer file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read tokenizer file {path}: {exc}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"tokenizer file {path} is not valid JSON ({exc}); re-save the tokenizer") from None
    try:
        return from_dict(d)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
