"""The run configuration for tools and users: :class:`RunConfig` and its loaders (defined in
:mod:`bigtrain.train.run_config`), and the generated configuration reference (``bigtrain config docs``).

    cfg = load_config("configs/debug.yaml", ["train.lr=1e-3", "model.num_layers=4"])
"""
from __future__ import annotations

from typing import Any

from bigtrain.sections import ConfigError, Section
from bigtrain.train.run_config import RunConfig, RunSection, config_from_dict, load_config

__all__ = ["ConfigError", "RunConfig", "RunSection", "config_from_dict", "load_config", "reference_markdown"]


def _shown(value: Any) -> Any:
    """A default as the reference shows it: null, a quoted string, a lowercase boolean, else the value."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return str(value).lower()
    return value


def _reference_rows(prefix: str, section_cls: type, default: Any) -> list[str]:
    """Table rows for a section's keys; a nested section (e.g. ``log.wandb``) gets a row of its own
    and then one row per sub-key (``log.wandb.mode``), so every settable key is listed."""
    import dataclasses
    import typing

    from bigtrain.sections import _type_name

    rows = []
    hints = typing.get_type_hints(section_cls)
    for f in dataclasses.fields(section_cls):
        value, tp = getattr(default, f.name), hints[f.name]
        doc = f.metadata.get("doc", "").replace("|", "\\|")
        if isinstance(tp, type) and issubclass(tp, Section):
            rows.append(f"| `{prefix}.{f.name}` | section | | {doc} |")
            rows += _reference_rows(f"{prefix}.{f.name}", tp, value)
            continue
        item = (typing.get_args(tp) or (None,))[0] if typing.get_origin(tp) is list else None
        if isinstance(item, type) and issubclass(item, Section):  # a list of sub-sections, e.g. data.sources
            rows.append(f"| `{prefix}.{f.name}` | list of {item.__name__} | `{value}` | {doc} |")
            rows += _reference_rows(f"{prefix}.{f.name}[]", item, item())
            continue
        rows.append(f"| `{prefix}.{f.name}` | {_type_name(tp).replace('|', 'or')} | `{_shown(value)}` | {doc} |")
    return rows


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from the field docs."""
    import dataclasses
    import typing

    from bigtrain.model.config import PRESETS

    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses by `bigtrain config docs > docs/configuration.md`;",
        "a test fails when this file is stale. Every key can be set in the YAML file or overridden on",
        "the command line as `section.key=value` (values are parsed as YAML).",
        "",
    ]
    for top in dataclasses.fields(RunConfig):
        section_cls = typing.get_type_hints(RunConfig)[top.name]
        default = getattr(RunConfig(), top.name)
        lines += [f"## `{top.name}`", "", (section_cls.__doc__ or "").strip(), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += _reference_rows(top.name, section_cls, default)
        lines.append("")
    lines += ["## Model presets (`model.preset`)", "", "| preset | " + " | ".join(next(iter(PRESETS.values()))) + " |",
              "|---" * (1 + len(next(iter(PRESETS.values())))) + "|"]
    for name, values in PRESETS.items():
        lines.append(f"| `{name}` | " + " | ".join(str(v) for v in values.values()) + " |")
    return "\n".join(lines) + "\n"
