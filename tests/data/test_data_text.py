"""Text sources (jsonl / text / parquet through HF datasets streaming): packing, resume, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bigtrain.data.streaming import file_order
from bigtrain.errors import UserError
from tests.data.test_data_pipeline import (
    EOS,
    assert_resume_exact,
    data_config,
    global_steps,
    pipeline,
    write_doc_shards,
    write_jsonl,
)


def expected_stream(texts: list[list[str]], epochs: int, seed: int, index: int = 0, shuffle: bool = True) -> list[int]:
    """Byte-level tokens of the documents in the source's per-epoch file order, each + EOS."""
    out: list[int] = []
    for e in range(epochs):
        for f in file_order(len(texts), [seed, index], e, shuffle):
            for t in texts[f]:
                out += [*t.encode("utf-8"), EOS]
    return out


def rows_of(steps: list[torch.Tensor]) -> list[list[int]]:
    return [r.tolist() for s in steps for r in s]


def test_packing_is_exact_across_documents_files_and_epochs(tmp_path: Path) -> None:
    texts = write_jsonl(tmp_path / "j", files=3, docs_per_file=5, seed=0)
    cfg = data_config([{"kind": "jsonl", "paths": [str(tmp_path / "j")]}], seq_len=16, num_workers=0)
    steps, state = global_steps(cfg, 1, 40, seed=5)
    stream = expected_stream(texts, epochs=8, seed=5)
    rows = rows_of(steps)
    assert len(rows) * 16 > 2 * len(expected_stream(texts, epochs=1, seed=5))  # the 40 steps reach epoch 2
    for j, row in enumerate(rows):  # sample j = tokens [16j, 16j + 17): no token split, dropped or repeated
        assert row == stream[16 * j: 16 * j + 17], f"sample {j}"
    assert state["sources"]["0:jsonl:j"]["epoch"] >= 2


def test_workers_do_not_change_the_stream(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "j", files=4, docs_per_file=300, seed=1)  # > one 256-record block per file
    base = [{"kind": "jsonl", "paths": [str(tmp_path / "j" / "*.jsonl")]}]
    a, sa = global_steps(data_config(base, seq_len=32, num_workers=0), 1, 60)
    b, sb = global_steps(data_config(base, seq_len=32, num_workers=2, prefetch_steps=2), 1, 60)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and sa == sb


@pytest.mark.parametrize("before,after", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_resume_exact_text_and_mixture(tmp_path: Path, before: int, after: int) -> None:
    write_jsonl(tmp_path / "j", files=3, docs_per_file=6, seed=2)
    write_doc_shards(tmp_path / "s", 30, seed=3)
    text_only = data_config([{"kind": "jsonl", "paths": [str(tmp_path / "j")]}], seq_len=16, num_workers=0)
    assert_resume_exact(text_only, n=24, k=9, before=before, after=after)  # mid-document, into epoch 2
    mix = data_config([{"kind": "jsonl", "paths": [str(tmp_path / "j")], "weight": 2},
                       {"kind": "shards", "paths": [str(tmp_path / "s")], "weight": 1}],
                      seq_len=16, num_workers=0, prefetch_steps=1)
    assert_resume_exact(mix, n=24, k=14, before=before, after=after)


def test_text_and_parquet_kinds(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t").mkdir()
    docs = ["first document\nwith two lines", "second one", "third"]
    for i, d in enumerate(docs):
        (tmp_path / "t" / f"{i}.txt").write_text(d)
    pq.write_table(pa.table({"body": docs, "n": [1, 2, 3]}), tmp_path / "p.parquet")
    for source in ({"kind": "text", "paths": [str(tmp_path / "t")]},
                   {"kind": "parquet", "paths": [str(tmp_path / "p.parquet")], "text_field": "body"}):
        cfg = data_config([source], seq_len=8, num_workers=0, shuffle=False)
        rows = rows_of(global_steps(cfg, 1, 2, global_seqs=4, micro=4)[0])
        stream = [t for d in docs for t in [*d.encode(), EOS]]
        assert [r for row in rows for r in row[:-1]][:40] == stream[:40]


def test_bos_and_eos_are_explicit(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "j", files=1, docs_per_file=20, seed=0)
    cfg = data_config([{"kind": "jsonl", "paths": [str(tmp_path / "j")]}], seq_len=16, num_workers=0, add_eos=False)
    rows = rows_of(global_steps(cfg, 1, 3)[0])
    assert EOS not in {t for r in rows for t in r}
    with pytest.raises(UserError, match="BOS"):
        pipeline(data_config([{"kind": "jsonl", "paths": [str(tmp_path / "j")]}], add_bos=True))


# --------------------------------------------------------------------------- bad input
def test_missing_file_and_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope.jsonl does not exist"):
        pipeline(data_config([{"kind": "jsonl", "paths": [str(tmp_path / "nope.jsonl")]}]))
    with pytest.raises(UserError, match=r"matches no jsonl files"):
        pipeline(data_config([{"kind": "jsonl", "paths": [str(tmp_path / "*.jsonl")]}]))


@pytest.mark.parametrize("content", ["", "\n".join(['{"text": ""}', '{"text": "  "}']) + "\n"])
def test_empty_source(tmp_path: Path, content: str) -> None:
    (tmp_path / "e.jsonl").write_text(content)
    p = pipeline(data_config([{"kind": "jsonl", "paths": [str(tmp_path / "e.jsonl")]}], num_workers=0))
    with pytest.raises(UserError, match="yields no documents"):
        p.next_step()


def test_invalid_utf8_is_replaced_and_counted(tmp_path: Path) -> None:
    good = "".join(json.dumps({"text": f"doc {i} " + "x" * 40}) + "\n" for i in range(10))
    (tmp_path / "b.jsonl").write_bytes(good.encode() + b'{"text": "bad \xff\xfe bytes"}\n' + good.encode())
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_bytes(b"text with \xc3 a broken byte " * 20)
    for source, n in (({"kind": "jsonl", "paths": [str(tmp_path / "b.jsonl")]}, 2),
                      ({"kind": "text", "paths": [str(tmp_path / "t")]}, 20)):
        p = pipeline(data_config([source], seq_len=16, num_workers=0, shuffle=False), global_seqs=64, micro=64)
        p.next_step()
        stats = p.log_stats()
        p.close()
        name = next(k for k in stats if k.endswith("/invalid_utf8"))
        assert stats[name] == n


def test_records_without_text_field_are_skipped_and_counted(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"document number {i} " * 3} if i % 4 else {"body": "no text"}) for i in range(400)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    p = pipeline(data_config([{"kind": "jsonl", "paths": [str(tmp_path / "m.jsonl")], "name": "m"}],
                             seq_len=16, num_workers=0, shuffle=False), global_seqs=64, micro=64)
    p.next_step()
    stats = p.log_stats()
    assert stats["data/m/missing_field"] > 0
    assert stats["data/m/missing_field"] * 3 == pytest.approx(stats["data/m/docs"], abs=3)
    p.close()


def test_mostly_bad_records_stop_the_run(tmp_path: Path) -> None:
    lines = [json.dumps({"content": f"wrong field {i}"} if i % 10 else {"text": f"doc {i} " * 20}) for i in range(300)]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    p = pipeline(data_config([{"kind": "jsonl", "paths": [str(tmp_path / "bad.jsonl")]}], seq_len=16,
                             num_workers=0), global_seqs=64, micro=64)
    with pytest.raises(UserError, match=r"have no 'text' text field \(latest: .*bad.jsonl record \d+\).*max_bad"):
        for _ in range(10):
            p.next_step()


def test_unreadable_jsonl_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{not json at all\n')
    # Found when the pipeline is built (every source file's first records are decoded then), not mid-run.
    with pytest.raises(UserError, match=r"x.jsonl:2 is not valid JSON"):
        pipeline(data_config([{"kind": "jsonl", "paths": [str(tmp_path / "x.jsonl")]}], num_workers=0))


def test_parquet_without_the_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match=r"p.parquet has no column 'text' \(columns: body\)"):
        pipeline(data_config([{"kind": "parquet", "paths": [str(tmp_path / "p.parquet")]}]))


def test_changed_file_count_is_rejected_on_resume(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "j", files=2, docs_per_file=5, seed=0)
    cfg = data_config([{"kind": "jsonl", "paths": [str(tmp_path / "j")]}], seq_len=16, num_workers=0)
    _, state = global_steps(cfg, 1, 2)
    write_jsonl(tmp_path / "j", files=3, docs_per_file=5, seed=0)
    p = pipeline(cfg)
    with pytest.raises(UserError, match="had 2 files"):
        p.load_state_dict(state)


def test_workers_split_blocks_without_overlap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker w of W tokenizes exactly the blocks b with b % W == w; together they cover every block once."""
    from types import SimpleNamespace

    import bigtrain.data.streaming as streaming
    from tests.data.test_data_pipeline import TOK

    write_jsonl(tmp_path / "j", files=2, docs_per_file=70, seed=4)
    files = sorted(str(p) for p in (tmp_path / "j").glob("*.jsonl"))
    spec = {"name": "j", "kind": "jsonl", "files": files, "text_field": "text",
            "tokenizer_json": TOK.backend.to_str(), "eos_token": TOK.eos_token, "bos_id": None, "eos_id": EOS,
            "seed": [0, 0], "shuffle": True, "max_epochs": 2}
    got: dict[int, list[int]] = {}
    for wid in range(3):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda w=wid: SimpleNamespace(id=w, num_workers=3))
        got[wid] = [item["b"] for item in streaming.BlockDataset(spec, (0, 0, 0), block=32)]
    every = sorted(b for bs in got.values() for b in bs)
    assert every == list(range(len(every))) and len(every) == 2 * 2 * 3  # 2 epochs x 2 files x ceil(70/32)
    assert all(b % 3 == w for w, bs in got.items() for b in bs)
