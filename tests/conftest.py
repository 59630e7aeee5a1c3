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
