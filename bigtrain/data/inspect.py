"""`bigtrain data inspect PATH`: what is in a prepared data directory, shard files, or a config's sources.

PATH may be
* a prepared data directory (manifest.json): per split, shards / documents / tokens / bytes;
* shard files (a file, directory or glob of *.bin): per shard group (header ``source``);
* a YAML run config: every entry of ``data.sources`` with its share of the mix and its size.

Each report ends with a decoded sample (the first document's first tokens) when a tokenizer is
known (``--tokenizer``, the directory's tokenizer.json, or the config's ``data.tokenizer``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bigtrain.data.shards import MANIFEST, Shard, list_shards, validate_tokens
from bigtrain.data.tokenizer import Tokenizer, load_tokenizer
from bigtrain.errors import UserError
from bigtrain.messages import say


def _table(rows: list[list[str]]) -> None:
    """A plain aligned text table (first row = header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, r in enumerate(rows):
        say("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if n == 0:
            say("  ".join("-" * w for w in widths))


def _shard_rows(groups: dict[str, list[Shard]]) -> list[list[str]]:
    rows = [["group", "shards", "documents", "tokens", "bytes", "bytes/token"]]
    for name, shards in groups.items():
        tokens = sum(s.num_tokens for s in shards)
        nbytes = sum(s.num_bytes for s in shards)
        rows.append([name, str(len(shards)), f"{sum(s.num_docs for s in shards):,}", f"{tokens:,}", f"{nbytes:,}",
                     f"{nbytes / tokens:.2f}" if tokens else "-"])
    return rows


def _sample(shards: list[Shard], tok: Tokenizer | None, num_tokens: int) -> None:
    """The first ``num_tokens`` tokens of the first non-empty shard, up to its first EOS, decoded."""
    shard = next((s for s in shards if s.num_tokens), None)
    if shard is None or num_tokens <= 0:
        return
    head = np.asarray(shard.tokens[:num_tokens]).astype(np.int64)
    ends = np.flatnonzero(head == shard.eos_id)
    if len(ends) and ends[0] > 0:
        head = head[: ends[0] + 1]
    say(f"\nsample ({len(head)} tokens from {shard.path}):")
    if tok is None:
        say("  " + " ".join(str(t) for t in head) + "\n  (token ids: pass --tokenizer to decode)")
    else:
        say("  " + tok.decode(head.tolist()).replace("\n", "\n  "))


def _check(shards: list[Shard], tok: Tokenizer | None) -> None:
    """Tokenizer identity and token range of every shard (scans the data)."""
    if tok is None:
        raise UserError("--check needs a tokenizer: pass --tokenizer PATH.")
    for s in shards:
        if s.tokenizer_fingerprint != tok.fingerprint:
            raise UserError(f"{s.path} was written with tokenizer {s.tokenizer_fingerprint}, not {tok.fingerprint} "
                            f"(the given tokenizer); use the tokenizer.json that prepared it.")
        validate_tokens(s, tok.vocab_size)
    say(f"check: {len(shards)} shard(s) OK (tokenizer {tok.fingerprint}, every id < {tok.vocab_size})")


def inspect_path(path: str, *, tokenizer: str | None = None, sample_tokens: int = 64, check: bool = False) -> None:
    """Print the report for ``path`` (see the module docstring)."""
    p = Path(path).expanduser()
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return _inspect_config(p, sample_tokens=sample_tokens)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    if p.is_dir() and (p / MANIFEST).is_file():
        from bigtrain.data.shards import verify_prepared

        manifest = verify_prepared(p)
        tok = tok or Tokenizer.from_file(p / manifest["tokenizer"].get("file", "tokenizer.json"))
        groups = {split: [Shard(p / rel) for rel in info.get("shards", [])]
                  for split, info in manifest.get("splits", {}).items()}
        say(f"{p}: prepared data, tokenizer vocab {tok.vocab_size} (eos {tok.eos_id}, fingerprint {tok.fingerprint})")
    else:
        files = list_shards(path)
        groups = {}
        for f in files:
            shard = Shard(f)
            groups.setdefault(str(shard.header.get("source", f.parent.name or "shards")), []).append(shard)
        if tok is None:
            for cand in (files[0].parent / "tokenizer.json", files[0].parent.parent / "tokenizer.json"):
                if cand.is_file():
                    tok = Tokenizer.from_file(cand)
                    break
        say(f"{path}: {len(files)} shard file(s)")
    _table(_shard_rows(groups))
    every = [s for shards in groups.values() for s in shards]
    say(f"total: {sum(s.num_docs for s in every):,} documents, {sum(s.num_tokens for s in every):,} tokens")
    if check:
        _check(every, tok)
    _sample(every, tok, sample_tokens)


def _inspect_config(path: Path, *, sample_tokens: int) -> None:
    """Per-source stats of a run config's data.sources (sizes from shard headers or file sizes)."""
    from bigtrain.data.config import DataConfig
    from bigtrain.data.sources import resolve_files
    from bigtrain.sections import load_yaml, parse_section

    # Only the data section is read: data sits below the run config in the import layering.
    cfg = parse_section(DataConfig, load_yaml(path).get("data") or {}, "data")
    tok = load_tokenizer(cfg.tokenizer)
    sources = cfg.source_list()
    total_w = sum(s.weight for s in sources)
    rows = [["source", "kind", "share", "files", "documents", "tokens", "MB", "max_epochs"]]
    first: list[Shard] = []
    for i, s in enumerate(sources):
        name = s.display_name(i)
        if s.kind == "shards":
            shards = [Shard(f) for spec in s.paths for f in list_shards(spec)]
            first = first or shards
            rows.append([name, s.kind, f"{s.weight / total_w:.1%}", str(len(shards)),
                         f"{sum(x.num_docs for x in shards):,}", f"{sum(x.num_tokens for x in shards):,}",
                         f"{sum(x.num_bytes for x in shards) / 1e6:.1f}", str(s.max_epochs or "-")])
        else:
            files = resolve_files(s.paths, s.kind, name)
            rows.append([name, s.kind, f"{s.weight / total_w:.1%}", str(len(files)), "(streamed)", "(streamed)",
                         f"{sum(f.stat().st_size for f in files) / 1e6:.1f}", str(s.max_epochs or "-")])
    say(f"{path}: {len(sources)} training source(s), seq_len {cfg.seq_len}, tokenizer vocab {tok.vocab_size}")
    _table(rows)
    _sample(first, tok, sample_tokens)
