"""Shared test set-up: offline, deterministic, small thread counts; the demo corpus fixture.

Fixtures and environment only: helpers that tests import live in tests/helpers.py.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
for key, value in {
    "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
}.items():
    os.environ.setdefault(key, value)
if sys.prefix != sys.base_prefix:
    # Any JIT-built torch extension (bigtrain keeps DeepSpeed from building its CPU one, see
    # parallel/zero.py import_deepspeed) goes to one folder per virtual environment: build flags name
    # the environment, so checkouts sharing ~/.cache/torch_extensions would rebuild in turn.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture(scope="session")
def demo_data() -> Path:
    """The demo corpus under REPO/data/demo (built once, reused by later runs and `make train`)."""
    from bigtrain.data.demo import prepare_demo
    from bigtrain.messages import capture

    with capture():  # its progress messages would only clutter the test output
        return prepare_demo(REPO / "data" / "demo", vocab_size=4096)


SHORT_DOCUMENTS = REPO / "data" / "short-docs"


@pytest.fixture(scope="session")
def short_documents(demo_data: Path) -> Path:
    """A corpus of short documents (2 to 12 made-up words, a few per 64-token sequence) in the demo tokenizer's
    ids, under REPO/data/short-docs: the demo's documents are whole plays, so its training sequences almost
    never cross a document boundary and document masking would not be exercised. Built once."""
    import json
    import random

    from bigtrain.data.demo import _dir_lock
    from bigtrain.data.prepare import prepare_corpus
    from bigtrain.messages import capture

    with _dir_lock(SHORT_DOCUMENTS.parent / ".short-docs-lock"):
        if (SHORT_DOCUMENTS / "manifest.json").is_file():
            return SHORT_DOCUMENTS
        rng = random.Random(0)
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
                 for _ in range(500)]
        source = SHORT_DOCUMENTS.parent / "short-docs-source.jsonl"
        with source.open("w") as fh:
            for _ in range(4000):
                fh.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(2, 12))) + "."}) + "\n")
        with capture():
            prepare_corpus([str(source)], SHORT_DOCUMENTS, tokenizer=str(demo_data / "tokenizer.json"),
                           val_fraction=0.1, num_workers=1, overwrite=True)
        source.unlink()
    return SHORT_DOCUMENTS
