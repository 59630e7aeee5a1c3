"""Shared test set-up: offline, deterministic, small thread counts; the demo corpus fixture.

Fixtures and environment only: helpers that tests import live in tests/helpers.py.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------------------------------- parallel runs
# `make test` runs the suite on 2 pytest-xdist workers. The scheduler below hands out whole test files, so a
# module-scoped fixture (a launch that trains many layouts) is built once, on one worker. The files below launch
# 2- and 4-rank trainings that take most of a minute each: they form one unit, so they run one after another on
# one worker while the other worker takes the rest of the suite, and two 4-rank launches never share 2 cores.
MULTI_RANK_FILES = frozenset({
    "tests/parallel/test_nd_parity.py", "tests/parallel/test_ep.py", "tests/parallel/test_parity.py",
    "tests/parallel/test_plan_vs_measured.py", "tests/optim/test_muon.py", "tests/checkpoint/test_reshard.py",
    "tests/e2e/test_slurm.py", "tests/parallel/test_zero.py",
})


@pytest.hookimpl(optionalhook=True)  # only when pytest-xdist is installed and running
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Whole files to workers (xdist's loadscope), with the multi-rank files as one unit. (xdist's own loadgroup
    marks do not reach the scheduler under pytest 9: it rewrites a node id attribute pytest no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndMultiRank(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "multi-rank" if path in MULTI_RANK_FILES else path

    return FilesAndMultiRank(config, log)


# The numerics tests that `make test-isa` runs under two CPU capabilities (docs/architecture.md, "Tolerance
# policy"): every run-vs-run comparison (layouts, backends, resume, reshard, compile vs eager), the golden run,
# and the model and kernel tests against their references. A new test of that kind goes in one of these files
# or is added here.
NUMERICS_FILES = frozenset({
    "tests/parallel/test_parity.py", "tests/parallel/test_nd_parity.py", "tests/parallel/test_ep.py",
    "tests/parallel/test_qk_norm_tp.py", "tests/parallel/test_apply.py", "tests/parallel/test_zero.py",
    "tests/optim/test_muon.py", "tests/checkpoint/test_reshard.py", "tests/checkpoint/test_resume_kill.py",
    "tests/checkpoint/test_export.py", "tests/checkpoint/test_export_tokenizer.py", "tests/checkpoint/test_hf_moe.py",
    "tests/golden/test_golden.py",
    "tests/model/test_model.py", "tests/model/test_moe.py", "tests/model/test_fp8.py",
    "tests/train/test_moe_training.py", "tests/data/test_data_resume.py", "tests/kernels/test_kernels_ops.py",
    "tests/kernels/test_kernels_cross_entropy.py", "tests/kernels/test_kernels_model.py",
})
# Module fixtures that train many layouts in multi-rank launches (most of a minute or more each): a test that uses
# one is `slow`, so `make test-fast` skips it (the cheap tests of the same files still run there).
HEAVY_FIXTURES = frozenset({"nd_runs", "straight_runs", "ep_runs", "parity_runs", "measured"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if Path(str(item.path)).resolve().relative_to(REPO).as_posix() in NUMERICS_FILES:
            item.add_marker(pytest.mark.numerics)
