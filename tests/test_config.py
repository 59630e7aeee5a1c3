"""Strict config: unknown keys, wrong types, inconsistent values, overrides, round trip, shipped configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bigtrain.config import ConfigError, config_from_dict, load_config
from bigtrain.sections import parse_override

REPO = Path(__file__).resolve().parents[1]


def err(overrides: list[str], path: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_are_valid_and_round_trip() -> None:
    cfg = load_config(None)
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.hash() == cfg.hash()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path: Path) -> None:
    cfg = load_config(path)
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_dotted_overrides_apply_with_yaml_types() -> None:
    cfg = load_config(REPO / "configs/debug.yaml", ["train.lr=1e-3", "model.num_layers=2", "data.shuffle=false"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.num_layers == 2
    assert cfg.data.shuffle is False
    assert cfg.model.dim == 128  # preset value kept


def test_unknown_key_names_path_and_closest_key() -> None:
    msg = err(["train.lrr=1e-3"])
    assert "train.lrr" in msg and "Did you mean 'train.lr'" in msg


def test_unknown_section_suggests_section() -> None:
    msg = err(["trian.lr=1"])
    assert "trian" in msg and "'train'" in msg


def test_wrong_type_names_path_and_value() -> None:
    msg = err(["train.max_steps=ten"])
    assert "train.max_steps" in msg and "'ten'" in msg and "integer" in msg
    assert "expected true or false" in err(["data.shuffle=maybe"])


def test_bad_choice_suggests() -> None:
    msg = err(["train.lr_schedule=cosin"])
    assert "train.lr_schedule" in msg and "'cosine'" in msg


def test_dim_not_divisible_by_heads() -> None:
    msg = err(["model.dim=100", "model.num_heads=3"])
    assert "model.dim" in msg and "100" in msg and "num_heads=3" in msg


@pytest.mark.parametrize(("overrides", "named"), [
    (["parallel.strategy=zero"], "parallel.strategy=zero"),
    (["model.kernels=triton"], "model.kernels=triton"),
    (["model.fp8=true"], "model.fp8=true"),
])
def test_fp64_refuses_what_cannot_compute_in_fp64(overrides: list[str], named: str) -> None:
    msg = err(["train.precision=fp64", *overrides])
    assert msg.startswith("train.precision: fp64") and named in msg and "train.precision=fp32" in msg, msg


def test_fp64_builds_an_fp64_model_and_plan() -> None:
    import torch

    from bigtrain.model import build_on_meta
    from bigtrain.plan import plan_memory

    cfg = load_config(None, ["train.precision=fp64", "parallel.strategy=fsdp"])
    assert {p.dtype for p in build_on_meta(cfg.model, torch.float64).parameters()} == {torch.float64}
    fp32 = load_config(None, ["train.precision=fp32", "parallel.strategy=fsdp"])
    assert plan_memory(cfg, 2, "fsdp", device="cpu").params == 2 * plan_memory(fp32, 2, "fsdp", device="cpu").params


def test_kv_heads_must_divide_heads() -> None:
    msg = err(["model.num_kv_heads=3"])
    assert "model.num_kv_heads" in msg and "3" in msg


def test_batch_tokens_must_divide_by_seq_len() -> None:
    msg = err(["train.global_batch_tokens=1000", "data.seq_len=256"])
    assert "train.global_batch_tokens" in msg and "1000" in msg and "1024" in msg


def test_batch_sequences_must_divide_by_micro_batch() -> None:
    msg = err(["train.global_batch_tokens=768", "data.seq_len=256", "train.micro_batch_size=2"])
    assert "micro_batch_size" in msg


def test_seq_len_cannot_exceed_model_window() -> None:
    assert "model.max_seq_len" in err(["data.seq_len=512", "train.global_batch_tokens=4096"])


def test_unknown_preset_lists_presets() -> None:
    msg = err(["model.preset=gpt3"])
    assert "gpt3" in msg and "llama3-8b" in msg


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    assert "does not exist" in err([], str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert "not valid YAML" in err([], str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    assert "mapping" in err([], str(scalar))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# caf\u00e9 run\ntrain:\n  lr: 0.001\n".encode("latin-1"))
    msg = err([], str(latin1))
    assert "not UTF-8" in msg and "0xe9 on line 1" in msg and "save the file as UTF-8" in msg, msg


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError):
        parse_override("train.lr")
    with pytest.raises(ConfigError):
        parse_override("train..lr=1")
    assert "is a value, not a section" in err(["train.lr=1", "train.lr.x=2"])


def test_batch_layout_derives_accumulation() -> None:
    cfg = load_config(None, ["train.global_batch_tokens=8192", "data.seq_len=256", "train.micro_batch_size=4"])
    assert cfg.batch_layout(1) == (32, 8)
    assert cfg.batch_layout(2) == (32, 4)
    with pytest.raises(ConfigError):
        cfg.batch_layout(3)


def test_committed_config_reference_is_fresh() -> None:
    from bigtrain.config import reference_markdown

    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == reference_markdown(), "run: bigtrain config docs > docs/configuration.md"


@pytest.mark.parametrize(("overrides", "suggestion"), [
    # 4 layers, pp 2 x 3 virtual stages: no pipeline degree fits with 3 virtual stages; 2 does with pp 2.
    (["parallel.pipeline_parallel=2", "parallel.pipeline_schedule=interleaved_1f1b",
      "parallel.pipeline_virtual_stages=3"], "pipeline_virtual_stages values that fit with pipeline_parallel=2: 2."),
    (["parallel.pipeline_parallel=3"], "pipeline_parallel values that fit with pipeline_virtual_stages=1: 2, 4."),
])
def test_a_pipeline_that_does_not_cut_the_layers_suggests_values_that_do(overrides: list[str],
                                                                         suggestion: str) -> None:
    msg = err(["model.num_layers=4", "model.tie_embeddings=false", "parallel.strategy=fsdp", *overrides])
    assert "cannot be cut into" in msg and msg.endswith(suggestion), msg
    assert "fit: ." not in msg
