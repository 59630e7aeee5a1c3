"""Token shards: the binary files training reads (memory-mapped, one flat array of token ids).

File layout (version 1, all integers little-endian; see docs/data.md):

    offset 0   8 bytes   magic b"BGTSHARD"
    offset 8   uint32    format version (1)
    offset 12  uint32    N = length of the JSON header in bytes
    offset 16  N bytes   UTF-8 JSON header (keys: HEADER_KEYS, optional "source")
    ...        zeros     padding so the token data starts at a multiple of DATA_ALIGN (64)
    data       tokens    num_tokens x uint16 (vocab_size <= 65536) or uint32

Each document's tokens are followed by one EOS token, so documents can be recovered by
splitting on eos_id. The file size is exactly data offset + num_tokens * itemsize, which
lets a reader detect truncated copies without scanning the data.

A prepared data directory (demo or `bigtrain data prepare`) holds tokenizer.json, train/ and
val/ shard folders and a manifest.json written last; read_manifest/verify_prepared check one.
"""
from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bigtrain.errors import UserError

if TYPE_CHECKING:
    from bigtrain.data.tokenizer import Tokenizer

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "bigtrain-data"
MAGIC = b"BGTSHARD"
FORMAT_VERSION = 1
DATA_ALIGN = 64
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
HEADER_KEYS: dict[str, type] = {
    "version": int,
    "dtype": str,
    "num_tokens": int,
    "num_docs": int,
    "num_bytes": int,
    "vocab_size": int,
    "eos_id": int,
    "tokenizer_fingerprint": str,
    "created_by": str,
}
_DTYPES: dict[str, np.dtype[Any]] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_MAX_HEADER = 1 << 20  # a header is a few hundred bytes; anything bigger is corruption
_FIX_HINT = "Re-create the shards with `bigtrain data prepare` (or `bigtrain data demo --force`)."


@lru_cache(maxsize=1)
def bigtrain_version() -> str:
    """Installed bigtrain version (for `created_by` fields), or 'unknown' from a bare checkout."""
    try:
        from importlib.metadata import version

        return version("bigtrain")
    except Exception:  # not installed (e.g. PYTHONPATH checkout): the version is informational only
        return "unknown"


def dtype_for_vocab(vocab_size: int) -> str:
    """Smallest supported token dtype name for ids in [0, vocab_size)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _data_offset(header_len: int) -> int:
    """Byte offset of the token data: prefix + header, rounded up to DATA_ALIGN."""
    end = _PREFIX.size + header_len
    return (end + DATA_ALIGN - 1) // DATA_ALIGN * DATA_ALIGN


def write_shard(
    path: str | Path,
    tokens: np.ndarray | Sequence[int],
    *,
    num_docs: int,
    num_bytes: int,
    vocab_size: int,
    eos_id: int,
    tokenizer_fingerprint: str,
    source: str | None = None,
) -> None:
    """Write one shard atomically (to `path + ".tmp"`, fsync, rename).

    Raises ValueError for programmer errors: ids outside [0, vocab_size), bad counts.
    """
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if not 0 < vocab_size <= 1 << 32 or not 0 <= eos_id < vocab_size:
        raise ValueError(f"bad vocab_size={vocab_size} / eos_id={eos_id}")
    if num_docs < 0 or num_bytes < 0:
        raise ValueError(f"num_docs={num_docs} and num_bytes={num_bytes} must be >= 0")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}), found range [{lo}, {hi}]")
    dtype = dtype_for_vocab(vocab_size)
    header: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "dtype": dtype,
        "num_tokens": int(arr.size),
        "num_docs": int(num_docs),
        "num_bytes": int(num_bytes),
        "vocab_size": int(vocab_size),
        "eos_id": int(eos_id),
        "tokenizer_fingerprint": str(tokenizer_fingerprint),
        "created_by": f"bigtrain {bigtrain_version()}",
    }
    if source is not None:
        header["source"] = str(source)
    hbytes = json.dumps(header, sort_keys=True).encode("utf-8")
    offset = _data_offset(len(hbytes))
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(hbytes)) + hbytes
    data = arr.astype(_DTYPES[dtype], copy=False)

    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(prefix)
        f.write(b"\0" * (offset - len(prefix)))
        f.write(np.ascontiguousarray(data).data.cast("B"))
        f.flush()
        # A rename can reach the disk before the data: fsync so a crash never leaves a short shard.
        os.fsync(f.fileno())
    os.replace(tmp, p)


class Shard:
    """A read-only, memory-mapped token shard with its header fields as attributes."""

    path: Path
    header: dict[str, Any]
    tokens: np.ndarray
    data_offset: int

    def __init__(self, path: str | Path):
        """Open and check `path`; raise UserError (naming the file) if it is missing or corrupt."""
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(
                f"Token shard {self.path} does not exist. Check data.train_path / data.val_path. {_FIX_HINT}"
            )
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(_PREFIX.size)
            if len(head) < _PREFIX.size or head[:8] != MAGIC:
                raise UserError(
                    f"{self.path} is not a bigtrain token shard (it does not start with {MAGIC!r}). "
                    f"Point the data path at shards written by bigtrain. {_FIX_HINT}"
                )
            _, version, hlen = _PREFIX.unpack(head)
            if version != FORMAT_VERSION:
                raise UserError(
                    f"{self.path} has shard format version {version}, but this bigtrain reads version "
                    f"{FORMAT_VERSION}. Upgrade bigtrain or re-create the shards. {_FIX_HINT}"
                )
            if hlen > min(size, _MAX_HEADER):
                raise UserError(f"{self.path} is truncated or corrupt (header length {hlen}). {_FIX_HINT}")
            raw = f.read(hlen)
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{self.path} has a corrupt header ({e}). {_FIX_HINT}") from None
        for key, typ in HEADER_KEYS.items():
            if not isinstance(header.get(key), typ) or isinstance(header.get(key), bool):
                raise UserError(f"{self.path} header lacks a valid {key!r} field. {_FIX_HINT}")
        if header["dtype"] not in _DTYPES:
            raise UserError(f"{self.path} has unsupported dtype {header['dtype']!r}. {_FIX_HINT}")
        dtype = _DTYPES[header["dtype"]]
        self.data_offset = _data_offset(hlen)
        expected = self.data_offset + header["num_tokens"] * dtype.itemsize
        if size != expected:
            raise UserError(
                f"{self.path} is truncated or corrupt: its header promises {header['num_tokens']} tokens "
                f"({expected} bytes in all) but the file has {size} bytes. It was probably copied "
                f"incompletely; copy it again. {_FIX_HINT}"
            )
        self.header = header
        if header["num_tokens"] == 0:
            self.tokens = np.zeros(0, dtype=dtype)  # mmap cannot map zero bytes
        else:
            self.tokens = np.memmap(
                self.path, dtype=dtype, mode="r", offset=self.data_offset, shape=(header["num_tokens"],)
            )

    @property
    def num_tokens(self) -> int:
        """Number of tokens in the shard (EOS tokens included)."""
        return int(self.header["num_tokens"])

    @property
    def num_docs(self) -> int:
        """Number of documents that end in this shard (= EOS tokens written)."""
        return int(self.header["num_docs"])

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of the source text of those documents."""
        return int(self.header["num_bytes"])

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer that wrote the shard."""
        return int(self.header["vocab_size"])

    @property
    def eos_id(self) -> int:
        """Id of the end-of-document token."""
        return int(self.header["eos_id"])

    @property
    def tokenizer_fingerprint(self) -> str:
        """`Tokenizer.fingerprint` of the tokenizer that wrote the shard."""
        return str(self.header["tokenizer_fingerprint"])

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"Shard({str(self.path)!r}, num_tokens={self.num_tokens}, dtype={self.header['dtype']})"


def list_shards(path_or_dir_or_glob: str | Path) -> list[Path]:
    """Shard files named by a file, a directory (its *.bin, not recursive) or a glob, sorted.

    Raises UserError if nothing matches.
    """
    spec = str(path_or_dir_or_glob)
    p = Path(spec).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        found = sorted(x for x in p.glob("*.bin") if x.is_file())
    elif glob.has_magic(spec):
        found = sorted(
            {Path(m) for m in glob.glob(str(p), recursive=True) if m.endswith(".bin") and Path(m).is_file()}
        )
    else:
        raise UserError(
            f"Data path {spec} does not exist. Give a directory of *.bin shards, a shard file or a glob; "
            "create shards with `bigtrain data demo` or `bigtrain data prepare FILES --out-dir DIR`."
        )
    if not found:
        raise UserError(
            f"No token shards (*.bin) found at {spec}. Create them with `bigtrain data demo` or "
            "`bigtrain data prepare FILES --out-dir DIR`, then set data.train_path=DIR/train and "
            "data.val_path=DIR/val."
        )
    return found


def validate_tokens(shard: Shard, vocab_size: int, chunk: int = 1 << 22) -> None:
    """Raise UserError if any token id in `shard` is >= vocab_size (reads the data in chunks)."""
    tokens = shard.tokens
    for start in range(0, len(tokens), chunk):
        top = int(tokens[start : start + chunk].max())
        if top >= vocab_size:
            raise UserError(
                f"{shard.path} contains token id {top}, but the model's vocab_size is {vocab_size}. "
                f"The shard was written with a tokenizer of {shard.vocab_size} tokens (fingerprint "
                f"{shard.tokenizer_fingerprint}): set model.vocab_size >= {shard.vocab_size}, or re-prepare "
                "the data with the tokenizer the model uses."
            )


# --------------------------------------------------------------------------- data directories
def manifest_head(tok: Tokenizer, tokenizer_source: str) -> dict[str, Any]:
    """The fields every prepared-data manifest starts with: format and the tokenizer's identity."""
    return {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "created_by": f"bigtrain {bigtrain_version()}",
        "tokenizer": {"file": "tokenizer.json", "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                      "bos_id": tok.bos_id, "fingerprint": tok.fingerprint, "source": tokenizer_source},
    }


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically; it is the last file written (its presence = complete)."""
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST)


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared data directory; UserError if it is missing or unreadable."""
    path = Path(data_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: {data_dir} is not a (complete) prepared data directory. "
                        "Create it with `bigtrain data demo` or `bigtrain data prepare`.") from None
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot read {path} ({e}). Re-create the data directory.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not a bigtrain data manifest. Re-create the data directory.")
    return manifest


def verify_prepared(data_dir: str | Path) -> dict[str, Any]:
    """Check a data directory against its manifest (headers, sizes, tokenizer); return the manifest.

    Cheap: opens every shard (header + file size) but does not scan the tokens.
    """
    from bigtrain.data.tokenizer import Tokenizer  # lazy: shard readers need no tokenizer

    root = Path(data_dir)
    manifest = read_manifest(root)
    tok_info = manifest.get("tokenizer", {})
    tok = Tokenizer.from_file(root / tok_info.get("file", "tokenizer.json"))
    if tok.fingerprint != tok_info.get("fingerprint"):
        raise UserError(f"{root}/tokenizer.json does not match {root}/{MANIFEST}. Re-create the data directory.")
    for split, info in manifest.get("splits", {}).items():
        shards = [Shard(root / rel) for rel in info.get("shards", [])]
        if any(s.tokenizer_fingerprint != tok.fingerprint for s in shards) or \
                sum(s.num_tokens for s in shards) != info.get("num_tokens"):
            raise UserError(f"The {split} shards in {root} do not match {MANIFEST}. Re-create the data directory.")
    return manifest
