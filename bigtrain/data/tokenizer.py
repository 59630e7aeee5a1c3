"""Tokenizer: a thin, typed wrapper around a Hugging Face `tokenizers` tokenizer.

bigtrain trains byte-level BPE tokenizers (GPT-2 style: every byte is a token, so any text
round-trips and bits-per-byte can be computed exactly) and can load any `tokenizer.json`.

Text is always encoded *without* special tokens: a literal ``<|endoftext|>`` inside a
document is tokenized as ordinary text, so only the data pipeline decides where documents
end (it appends :data:`EOS_TOKEN` after each one).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from bigtrain.data.documents import find_files, iter_documents
from bigtrain.errors import UserError

EOS_TOKEN = "<|endoftext|>"
"""End-of-document token of tokenizers trained by bigtrain (same string as GPT-2)."""

# Tokens that end a document in common pretrained tokenizers, most specific first. Used when a
# loaded tokenizer has no EOS_TOKEN and no tokenizer_config.json next to it names one.
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|end|>")
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")

MIN_BPE_VOCAB = 257
"""Smallest byte-level vocabulary: 256 byte tokens + EOS."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_ALPHABET = frozenset(bytes_to_unicode().values())


class Tokenizer:
    """Text <-> token ids, with the metadata the trainer needs (EOS id, vocab size, bytes/token)."""

    def __init__(self, hf: HFTokenizer, *, eos_token: str | None = None, bos_token: str | None = None):
        """Wrap a `tokenizers.Tokenizer`; EOS/BOS are looked up among well-known names if not given."""
        self._tok = hf
        # Documents are plain text: never turn a literal "<|endoftext|>" in the data into EOS.
        self._tok.encode_special_tokens = True
        vocab = hf.get_vocab(with_added_tokens=True)
        if eos_token is None:
            eos_token = next((t for t in _EOS_CANDIDATES if t in vocab), None)
        if eos_token is None or eos_token not in vocab:
            raise UserError(
                f"The tokenizer has no end-of-document token (looked for {eos_token or ', '.join(_EOS_CANDIDATES)}). "
                "bigtrain separates documents with an EOS token: use a tokenizer that has one, or let "
                "`bigtrain data prepare` train a byte-level BPE tokenizer (omit --tokenizer)."
            )
        if bos_token is None:
            bos_token = next((t for t in _BOS_CANDIDATES if t in vocab), None)
        self._eos_token = eos_token
        self._eos_id = vocab[eos_token]
        self._bos_id = vocab.get(bos_token) if bos_token is not None else None
        # Embedding tables are indexed by id, so size by the largest id, not the token count.
        self._vocab_size = max(vocab.values()) + 1

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_file(cls, path: str | Path, *, eos_token: str | None = None) -> Tokenizer:
        """Load a Hugging Face `tokenizer.json` (or a directory containing one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise UserError(
                f"Tokenizer file {p} does not exist. Pass the path of a Hugging Face `tokenizer.json` "
                "(for example the one `bigtrain data prepare` or `bigtrain data demo` writes into the "
                "data directory)."
            )
        try:
            hf = HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise UserError(
                f"Could not read tokenizer {p}: {e}. The file must be a Hugging Face `tokenizers` JSON "
                "file (tokenizer.json); re-create or re-download it."
            ) from None
        bos_token = None
        cfg = p.parent / "tokenizer_config.json"
        if cfg.is_file():
            # HF model folders name their EOS/BOS here; trust that over our guesses.
            try:
                meta = json.loads(cfg.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                meta = {}
            eos_token = eos_token or _token_name(meta.get("eos_token"))
            bos_token = _token_name(meta.get("bos_token"))
        return cls(hf, eos_token=eos_token, bos_token=bos_token)

    @classmethod
    def train_bpe(cls, files: Sequence[str | Path], vocab_size: int, *, text_key: str = "text",
                  show_progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE tokenizer with `vocab_size` tokens (EOS included) on the documents of files.

        ``files`` are files, directories or globs of text / jsonl / parquet files, read as `bigtrain data
        prepare` reads them (:mod:`bigtrain.data.documents`; ``text_key`` names the jsonl field / parquet column).
        """
        paths = find_files(files, owner="tokenizer training", option="the input paths")
        texts = (text for text, _ in iter_documents(paths, text_key))
        return cls.train_bpe_from_iterator(texts, vocab_size, show_progress=show_progress)

    @classmethod
    def train_bpe_from_iterator(
        cls, texts: Iterable[str], vocab_size: int, *, show_progress: bool = False
    ) -> Tokenizer:
        """Train a byte-level BPE tokenizer on an iterable of texts (documents or text blocks)."""
        if vocab_size < MIN_BPE_VOCAB:
            raise UserError(
                f"vocab_size={vocab_size} is too small for a byte-level BPE tokenizer: it needs at least "
                f"{MIN_BPE_VOCAB} (256 byte tokens + EOS). Use e.g. 4096 for small corpora, 32000+ for large ones."
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            # All 256 bytes are tokens even if unseen, so any text can be encoded later.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, eos_token=EOS_TOKEN)

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """The file-less fallback: token id b is byte b (0-255), EOS is 256 (vocab 257)."""
        b2u = bytes_to_unicode()
        vocab = {b2u[b]: b for b in range(256)}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        # No merges, so the regex word split would only cost time.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
        return cls(hf, eos_token=EOS_TOKEN)

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        """Write the tokenizer as `tokenizer.json` (atomically: temp file, then rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        self._tok.save(str(tmp), pretty=True)
        os.replace(tmp, p)

    # ----------------------------------------------------------------- properties
    @property
    def backend(self) -> HFTokenizer:
        """The wrapped `tokenizers.Tokenizer` (for features this wrapper does not expose)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids (largest id + 1): the size the model's embedding table needs."""
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        """Id of the end-of-document token."""
        return self._eos_id

    @property
    def eos_token(self) -> str:
        """The end-of-document token string."""
        return self._eos_token

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None if the tokenizer has none."""
        return self._bos_id

    @cached_property
    def fingerprint(self) -> str:
        """First 16 hex digits of the sha256 of the canonical (sorted, compact) tokenizer JSON."""
        canonical = json.dumps(json.loads(self._tok.to_str()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    # ----------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts (parallel in Rust unless TOKENIZERS_PARALLELISM=false)."""
        texts = list(texts)
        # encode_batch_fast skips offset tracking, which we never use (~2x faster).
        fast = getattr(self._tok, "encode_batch_fast", None)
        encs = (fast or self._tok.encode_batch)(texts, add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids; special tokens (EOS) are kept so document breaks stay visible."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        """int64 array (vocab_size,): UTF-8 bytes each token adds to decoded text (0 for specials).

        Exact for byte-level BPE (each character of a token string stands for one byte); for
        other tokenizers it is ``len(decode([id]).encode())``, an approximation.
        """
        out = np.zeros(self._vocab_size, dtype=np.int64)
        added = self._tok.get_added_tokens_decoder()
        byte_level = self._is_byte_level()
        for token, idx in self._tok.get_vocab(with_added_tokens=True).items():
            if idx in added:
                # Specials never come from text; other added tokens match their literal content.
                out[idx] = 0 if added[idx].special else len(added[idx].content.encode("utf-8"))
            elif byte_level and all(c in _BYTE_ALPHABET for c in token):
                out[idx] = len(token)
            else:
                out[idx] = len(self._tok.decode([idx], skip_special_tokens=False).encode("utf-8"))
        return out

    def _is_byte_level(self) -> bool:
        """Whether tokens are strings over the ByteLevel alphabet (one character per byte)."""
        spec = json.loads(self._tok.to_str())
        decoder = spec.get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
        return (spec.get("model") or {}).get("type") == "BPE" and "ByteLevel" in kinds

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, fingerprint={self.fingerprint})"


def _token_name(value: object) -> str | None:
    """A token string from tokenizer_config.json, where it may be a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    content = value.get("content") if isinstance(value, dict) else None
    return content if isinstance(content, str) else None


BYTE_LEVEL = "byte"
"""`data.tokenizer` value (as is '') that selects the file-less byte-level tokenizer."""


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer named by ``data.tokenizer``: a tokenizer.json path, or '' / 'byte' for byte-level."""
    if path in ("", BYTE_LEVEL):
        return Tokenizer.byte_level()
    return Tokenizer.from_file(path)


def tokenizer_file(path: str | Path) -> Path | None:
    """The file ``data.tokenizer`` names (a folder's ``tokenizer.json``), or None for the byte-level fallback."""
    if str(path) in ("", BYTE_LEVEL):
        return None
    p = Path(path).expanduser()
    return p / "tokenizer.json" if p.is_dir() else p


def train_tokenizer_files(files: Sequence[str], vocab_size: int, out: str | Path, *,
                          text_key: str = "text") -> Tokenizer:
    """`bigtrain data tokenizer train`: a byte-level BPE of ``vocab_size`` trained on files, saved to ``out``."""
    if vocab_size < MIN_BPE_VOCAB:  # before reading any file
        raise UserError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_BPE_VOCAB}.")
    tok = Tokenizer.train_bpe(files, vocab_size, text_key=text_key)
    out_path = Path(out)
    if out_path.is_dir():
        out_path = out_path / "tokenizer.json"
    try:
        tok.save(out_path)  # atomic: a temporary sibling, then a rename
    except OSError as exc:
        raise UserError(f"data tokenizer train: cannot write {out_path} ({exc.strerror or exc}); choose a writable "
                        f"--out.") from None
    return tok
