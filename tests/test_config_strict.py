"""Strict config (issue: hardening §1 and §3): finite floats and bounds wherever a value is parsed, keys given
twice in a file or on the command line, TABs in indentation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from bigtrain.config import load_config
from bigtrain.sections import ConfigError, Section, doc_field, parse_section


@pytest.mark.parametrize("override, words", [
    ("train.lr=nan", "train.lr: must be a finite number, got 'nan'"),
    ("train.lr=inf", "train.lr: must be a finite number, got 'inf'"),
    ("train.weight_decay=nan", "train.weight_decay: must be a finite number"),
    ("train.grad_clip=nan", "train.grad_clip: must be a finite number"),
    ("train.adam_eps=-1", "train.adam_eps: must be > 0, got -1.0"),
    ("train.adam_eps=0", "train.adam_eps: must be > 0, got 0.0"),
    ("model.norm_eps=.nan", "model.norm_eps: must be a finite number"),
    ("data.max_bad_fraction=-.inf", "data.max_bad_fraction: must be a finite number"),
])
def test_non_finite_and_out_of_range_floats_are_refused(override: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("configs/debug.yaml", [override])
    assert words in str(info.value)


def test_a_float_key_added_later_is_covered_without_validation_code() -> None:
    @dataclass(frozen=True)
    class NewSection(Section):
        scale: float = doc_field(1.0, "a new knob with no validate()")
        rate: float = doc_field(0.5, "bounded where declared", ge=0, lt=1)

    with pytest.raises(ConfigError, match=r"new\.scale: must be a finite number"):
        parse_section(NewSection, {"scale": float("nan")}, "new")
    with pytest.raises(ConfigError, match=r"new.rate: must be >= 0 and < 1, got 1.0"):
        parse_section(NewSection, {"rate": 1}, "new")
    assert parse_section(NewSection, {"scale": "2e-3", "rate": 0}, "new") == NewSection(scale=2e-3, rate=0.0)


@pytest.mark.parametrize("text, words", [
    ("train:\n  lr: 1e-3\nmodel:\n  dim: 64\ntrain:\n  max_steps: 3\n", "train is given twice (lines 1 and 5)"),
    ("train:\n  lr: 1e-3\n  lr: 2e-3\n", "train.lr is given twice (lines 2 and 3)"),
    ("data:\n  sources:\n    - paths: [a]\n      paths: [b]\n", "data.sources[0].paths is given twice (lines 3 and 4)"),
    ("train:\n\tlr: 1e-3\n", "a TAB character in the indentation (line 2); YAML must be indented with spaces"),
])
def test_yaml_keys_given_twice_and_tabs_are_errors(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert words in str(info.value) and str(path) in str(info.value)


def test_an_override_given_twice_on_the_command_line_is_an_error(capfd: pytest.CaptureFixture[str]) -> None:
    from bigtrain import cli

    status = cli.main(["config", "show", "configs/debug.yaml", "train.lr=1e-3", "model.dim=64", "train.lr=2e-3"])
    err = capfd.readouterr().err
    assert status == 2 and "override train.lr is given twice ('train.lr=1e-3' and 'train.lr=2e-3'); keep one." in err
    # Programs compose override lists (defaults, then specifics): there the later one wins, as documented.
    assert load_config("configs/debug.yaml", ["train.lr=1e-3", "train.lr=2e-3"]).train.lr == 2e-3
