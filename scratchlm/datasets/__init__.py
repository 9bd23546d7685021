"""Small, permissively licensed data sets that ship with scratchlm (attributions in README.md here).

    from scratchlm.datasets import dataset_path
    dataset_path("names.txt")            # a pathlib.Path inside the installed package

Each file is a byte-for-byte copy of its source (sha256 in README.md); the loaders that give them
their splits live with the code that uses them (``scratchlm.data`` for text corpora).
"""
from __future__ import annotations

from pathlib import Path

DATASETS_DIR = Path(__file__).resolve().parent

SHIPPED = {
    "names.txt": "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d",
    "coco_captions_train.txt": "2c0fd1f0f43aac6a9dc3926a535516ccf395de535e15ac1fd17cd569420736f5",
    "coco_captions_test.txt": "72e25c9fb4d2cd43182ac602c92f6ffc377762147f9709572943b0b09174bcae",
    "eng-fra-5k.tsv": "d952b56a181da5270b7bb4ded3f3bbe61e67a9b1de0e0fbc1d46438c71fb55a7",
    "sentiment_sentences.tsv": "fe71fa80eae02a676cc8cbb79ae2c5de5d247ae63968a119a0506301124c4264",
}


def dataset_path(filename: str) -> Path:
    """The path of a shipped data file (one of ``SHIPPED``)."""
    if filename not in SHIPPED:
        raise KeyError(f"no shipped data set {filename!r}; shipped: {', '.join(sorted(SHIPPED))}")
    return DATASETS_DIR / filename
