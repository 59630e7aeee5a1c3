"""Raw documents: the one place that finds, decompresses and decodes text / jsonl / parquet files.

Three uses read raw files: `bigtrain data prepare` (:mod:`bigtrain.data.prepare`), text sources streamed
during training (:mod:`bigtrain.data.streaming`) and `bigtrain data tokenizer train`
(:mod:`bigtrain.data.tokenizer`). All of them go through this module, so a file is found, accepted and
decoded the same way wherever it is read:

* **Format by suffix** (case-insensitive), one table, :data:`SUFFIXES`: ``text`` is one document per file,
  ``jsonl`` one record per non-blank line (or a JSON array of records), ``parquet`` one record per row.
  ``.gz`` files are decompressed with gzip.
* **Bytes decode as UTF-8 exactly as stored**: no newline translation (``\\r\\n`` stays), so the model sees
  the file's bytes. Invalid UTF-8 and lone surrogates (from JSON ``"\\ud800"`` escapes) become U+FFFD and are
  counted per record.
* **A record is** :class:`Text` (its document, possibly empty) **or** :class:`NoText` (the text field is
  missing, null or not a string). Each use decides what a NoText means: prepare refuses a missing or
  mistyped field (a wrong ``--text-key`` is found at once), training skips and counts it
  (``data.max_bad_fraction`` decides when to stop).

Records are read in *blocks* (:func:`read_blocks`) that are decoded only when asked, so a streaming worker
skips the blocks of other workers, and the records before a resume position, without parsing them.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from bigtrain import messages
from bigtrain.errors import UserError

SUFFIXES: dict[str, tuple[str, ...]] = {
    "text": (".txt", ".md", ".txt.gz", ".md.gz"),
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
    "parquet": (".parquet",),
}
"""File suffixes of each raw format: the one table used by prepare, streaming and tokenizer training."""

FORMATS: tuple[str, ...] = tuple(SUFFIXES)
_LAYOUT = {"text": "one document per file", "jsonl": "one document per line or array record",
           "parquet": "one document per row"}
_SURROGATES = re.compile("[\ud800-\udfff]")
_READ_RECORDS = 1024  # records per block when a whole file is read (prepare, tokenizer training)
_LINES_PER_CHUNK = 4096  # jsonl lines gathered before re-cutting into blocks


# --------------------------------------------------------------------------- finding files
def format_of(path: Path) -> str | None:
    """The raw format of ``path`` by its suffix (``text``, ``jsonl``, ``parquet``), or None if unsupported."""
    name = path.name.lower()
    return next((fmt for fmt, suffixes in SUFFIXES.items() if name.endswith(suffixes)), None)


def describe_formats(formats: Sequence[str] = FORMATS) -> str:
    """The formats and their suffixes, for messages."""
    return "; ".join(f"{fmt} ({', '.join(SUFFIXES[fmt])}: {_LAYOUT[fmt]})" for fmt in formats)


def find_files(specs: Sequence[str | Path], *, formats: Sequence[str] = FORMATS, owner: str = "input",
               option: str = "the paths given") -> list[Path]:
    """The files named by ``specs`` (each a file, a directory searched recursively, or a glob), de-duplicated.

    Directories and globs yield only the files of ``formats`` (hidden files are skipped in directories); a
    file named directly must be of one of them. ``owner`` and ``option`` name, in messages, what the paths
    belong to and where the user sets them (e.g. ``source 'web'`` and ``data.sources[].paths``).
    """
    suffixes = tuple(s for fmt in formats for s in SUFFIXES[fmt])
    kinds = "input" if tuple(formats) == FORMATS else "/".join(formats)

    def wanted(p: Path) -> bool:
        return p.is_file() and p.name.lower().endswith(suffixes)

    files: list[Path] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_file():
            if not wanted(p):
                raise UserError(f"{owner}: {spec} has an unsupported type for {kinds} files (by its suffix). "
                                f"Supported: {describe_formats(formats)}. Rename the file or check {option}.")
            found = [p]
        elif p.is_dir():
            found = sorted(x for x in p.rglob("*") if wanted(x) and not x.name.startswith("."))
        elif glob.has_magic(str(spec)):
            found = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if wanted(Path(m)))
        else:
            raise UserError(f"{owner}: {spec} does not exist. Check {option} "
                            "(files, directories and globs are accepted).")
        if not found:
            raise UserError(f"{owner}: {spec} matches no {kinds} files. Supported: {describe_formats(formats)}. "
                            f"Check the glob or directory in {option}.")
        files.extend(found)
    # The same file named twice would repeat its documents (and could put copies into both train and val).
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def check_parquet_column(path: Path, text_key: str, fix: str) -> Any:
    """Open a Parquet file whose ``text_key`` column holds strings (UserError otherwise, ending in ``fix``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise UserError(f"Cannot read {path} as Parquet ({e}). Check the file.") from None
    names = parquet.schema_arrow.names
    if text_key not in names:
        raise UserError(f"{path} has no column {text_key!r} (columns: {', '.join(names)}). {fix}")
    kind = parquet.schema_arrow.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column {text_key!r} has type {kind}, expected strings. {fix}")
    return parquet


# --------------------------------------------------------------------------- records
class Text(NamedTuple):
    """A record's document text (may be empty or blank) and how many invalid sequences became U+FFFD."""

    text: str
    num_invalid: int = 0


class NoText(NamedTuple):
    """A record without document text: its field is missing, null or not a string."""

    where: str     # "FILE:LINE" or "FILE record N", for messages
    problem: str   # e.g. "record has no 'text' field (its fields: id, body)"
    is_null: bool  # the field is there and null: an empty document rather than a mistake


Record = Text | NoText


def decode_utf8(raw: bytes) -> Text:
    """UTF-8 text of ``raw``, invalid sequences replaced with U+FFFD and counted (genuine U+FFFD are not)."""
    try:
        return Text(raw.decode("utf-8"))
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return Text(text, text.count("\ufffd") - raw.count(b"\xef\xbf\xbd"))


def _clean(text: str, num_invalid: int = 0) -> Text:
    """Lone surrogates (JSON "\\ud800" escapes) cannot be encoded as UTF-8: they become U+FFFD, counted."""
    if _SURROGATES.search(text) is None:
        return Text(text, num_invalid)
    return Text(_SURROGATES.sub("\ufffd", text), num_invalid + len(_SURROGATES.findall(text)))


def _json_record(value: Any, where: str, text_key: str, num_invalid: int) -> Record:
    """The record of one parsed JSON value: a string is a document, an object holds it in ``text_key``."""
    if isinstance(value, str):
        return _clean(value, num_invalid)
    if not isinstance(value, dict):
        return NoText(where, f"expected a JSON object with a {text_key!r} field, found {type(value).__name__}", False)
    if text_key not in value:
        keys = ", ".join(list(value)[:10]) or "none"
        return NoText(where, f"record has no {text_key!r} field (its fields: {keys})", False)
    text = value[text_key]
    if text is None:
        return NoText(where, f"field {text_key!r} is null", True)
    if not isinstance(text, str):
        return NoText(where, f"field {text_key!r} is a {type(text).__name__}, expected a string", False)
    return _clean(text, num_invalid)


# --------------------------------------------------------------------------- blocks
@dataclass
class RecordBlock:
    """``len(block)`` consecutive records of one file, from record ``first`` on, decoded by :meth:`decode`."""

    path: Path
    first: int
    raw: Sequence[Any]  # undecoded records (lines, parsed array items, an Arrow array, the file's bytes)
    _decode: Callable[[RecordBlock], list[Record]]

    def __len__(self) -> int:
        return len(self.raw)

    def decode(self) -> list[Record]:
        """The block's records, in order."""
        return self._decode(self)


def read_blocks(path: Path, text_key: str, *, start: int = 0, size: int = _READ_RECORDS) -> Iterator[RecordBlock]:
    """Blocks of ``size`` records of ``path`` (the last may be shorter), from record ``start`` on.

    Record numbers count what the format calls a record: the one document of a text file, the non-blank
    lines (or array items) of a jsonl file, the rows of a Parquet file. A malformed file raises UserError
    naming it (a bad JSON line: when its block is decoded or, for an array file, when it is read).
    """
    fmt = format_of(path)
    try:
        if fmt == "text":
            if start == 0:
                yield RecordBlock(path, 0, [_read_bytes(path)], _decode_text)
        elif fmt == "parquet":
            yield from _parquet_blocks(path, text_key, start, size)
        elif fmt == "jsonl":
            yield from _jsonl_blocks(path, text_key, start, size)
        else:
            raise UserError(f"{path} has an unsupported type. Supported: {describe_formats()}.")
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:  # a .gz that is not (or no longer) gzip
        raise UserError(f"{path}: cannot be decompressed ({type(exc).__name__}: {exc}); its name ends in .gz but "
                        f"it is not a complete gzip file. Re-compress it, rename it, or leave it out.") from None


def read_records(path: Path, text_key: str) -> Iterator[Record]:
    """Every record of one file, in order."""
    for block in read_blocks(path, text_key):
        yield from block.decode()


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_bytes(path: Path) -> bytes:
    with _open(path) as f:
        return f.read()


# A "text" file with NUL bytes, or with this share of its bytes invalid UTF-8, is most likely binary.
BINARY_INVALID_FRACTION = 0.1


def _decode_text(block: RecordBlock) -> list[Record]:
    raw = block.raw[0]
    text = decode_utf8(raw)
    has_nul = b"\x00" in raw[:65536]
    if raw and (has_nul or text.num_invalid > BINARY_INVALID_FRACTION * len(raw)):
        nul_note = ", NUL bytes" if has_nul else ""
        messages.warn(f"warning: {block.path} looks like a binary file, not text ({text.num_invalid:,} invalid "
                      f"UTF-8 sequences in {len(raw):,} bytes{nul_note}); it is read as text with U+FFFD "
                      f"replacements. Leave it out of the inputs if it is not text.")
    return [text]


def _recut(chunks: Iterable[Sequence[Any]], start: int, size: int,
           join: Callable[[list[Any]], Sequence[Any]]) -> Iterator[tuple[int, Sequence[Any]]]:
    """(first record, records) in blocks of ``size`` from record ``start``, out of chunks of any length.

    Chunks wholly before ``start`` are only counted, never decoded: that is what makes skipping cheap.
    """
    pending: list[Sequence[Any]] = []
    num_pending, pos, first = 0, 0, start
    for chunk in chunks:
        if pos + len(chunk) <= start:
            pos += len(chunk)
            continue
        if pos < start:
            chunk = chunk[start - pos:]
        pos = max(pos, start) + len(chunk)
        pending.append(chunk)
        num_pending += len(chunk)
        while num_pending >= size:
            merged = pending[0] if len(pending) == 1 else join(pending)
            yield first, merged[:size]
            first += size
            rest = merged[size:]
            pending, num_pending = ([rest] if len(rest) else []), len(rest)
    if num_pending:
        yield first, pending[0] if len(pending) == 1 else join(pending)


def _join_lists(parts: list[Any]) -> list[Any]:
    return [item for part in parts for item in part]


def _jsonl_blocks(path: Path, text_key: str, start: int, size: int) -> Iterator[RecordBlock]:
    with _open(path) as f:
        if f.read(1 << 10).lstrip().startswith(b"["):  # a .json file holding one array of records
            f.seek(0)
            yield from _json_array_blocks(path, f.read(), text_key, start, size)
            return
        f.seek(0)

        def decode(block: RecordBlock) -> list[Record]:
            records: list[Record] = []
            for lineno, line in block.raw:
                text = decode_utf8(line)
                try:
                    value = json.loads(text.text)
                except ValueError as e:
                    raise UserError(f"{path}:{lineno} is not valid JSON ({e}). "
                                    "Expected one JSON object per line.") from None
                records.append(_json_record(value, f"{path}:{lineno}", text_key, text.num_invalid))
            return records

        for first, lines in _recut(_line_chunks(f), start, size, _join_lists):
            yield RecordBlock(path, first, lines, decode)


def _line_chunks(f: io.BufferedIOBase) -> Iterator[list[tuple[int, bytes]]]:
    """(line number, line) of the non-blank lines, in chunks (blank lines are not records)."""
    chunk: list[tuple[int, bytes]] = []
    for lineno, line in enumerate(f, 1):
        if line.strip():
            chunk.append((lineno, line))
            if len(chunk) == _LINES_PER_CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _json_array_blocks(path: Path, raw: bytes, text_key: str, start: int, size: int) -> Iterator[RecordBlock]:
    text = decode_utf8(raw)
    try:
        values = json.loads(text.text)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}).") from None
    if not isinstance(values, list):
        raise UserError(f"{path} starts like a JSON array but is not one. Expected an array of records, "
                        "or one JSON object per line.")

    # The file is decoded as a whole, so its invalid-UTF-8 count goes with its first record.
    def decode(block: RecordBlock) -> list[Record]:
        return [_json_record(value, f"{path} record {i}", text_key, text.num_invalid if i == 0 else 0)
                for i, value in enumerate(block.raw, block.first)]

    for first, values_ in _recut([values], start, size, _join_lists):
        yield RecordBlock(path, first, values_, decode)


def _parquet_blocks(path: Path, text_key: str, start: int, size: int) -> Iterator[RecordBlock]:
    import pyarrow as pa

    parquet = check_parquet_column(path, text_key, "Name the text column with --text-key (data prepare) or "
                                                   "data.sources[].text_field (training).")

    # Arrow strings are valid UTF-8 already; the column type was checked, so a non-string is a null.
    def decode(block: RecordBlock) -> list[Record]:
        values = block.raw.to_pylist()  # type: ignore[attr-defined]  # an Arrow array
        return [Text(value) if isinstance(value, str)
                else NoText(f"{path} record {i}", f"field {text_key!r} is null", True)
                for i, value in enumerate(values, block.first)]

    # Arrow arrays, not Python strings, until a block is decoded; row groups skipped before `start` cost little.
    columns = (batch.column(0) for batch in parquet.iter_batches(batch_size=max(size, 1 << 14), columns=[text_key]))
    for first, values in _recut(columns, start, size, pa.concat_arrays):
        yield RecordBlock(path, first, values, decode)


# --------------------------------------------------------------------------- whole documents
@dataclass
class ScanStats:
    """What a pass over the inputs found."""

    num_docs: int = 0
    num_bytes: int = 0
    num_empty: int = 0
    num_invalid_utf8: int = 0


def iter_documents(files: Sequence[Path], text_key: str, stats: ScanStats | None = None, *,
                   key_option: str = "--text-key") -> Iterator[tuple[str, int]]:
    """(text, UTF-8 bytes) of every non-empty document of ``files``, in order (files, then records).

    Empty and blank documents and null fields are skipped (and counted); a record whose text field is
    missing or not a string is a UserError that names the record and ``key_option``.
    """
    for path in files:
        for record in read_records(path, text_key):
            if isinstance(record, NoText):
                if not record.is_null:
                    raise UserError(f"{record.where}: {record.problem}. Check the file, or name the text field "
                                    f"with {key_option}.")
                text, num_invalid = "", 0
            else:
                text, num_invalid = record
            if stats is not None:
                stats.num_invalid_utf8 += num_invalid
            if not text.strip():
                if stats is not None:
                    stats.num_empty += 1
                continue
            nbytes = len(text.encode("utf-8"))
            if stats is not None:
                stats.num_docs += 1
                stats.num_bytes += nbytes
            yield text, nbytes
