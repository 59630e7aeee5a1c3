"""Tokenizer: BPE training, round trips, EOS handling, exact byte lengths, fingerprints, errors."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from bigtrain.data.tokenizer import EOS_TOKEN, Tokenizer
from bigtrain.errors import UserError

WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then", "sleeps", "under", "warm",
    "sun", "while", "birds", "sing",
]
SAMPLE = "Thé quick fox — jumps! 😀 日本語 tab\there\nnew line  double  spaces\r\n<|endoftext|> literal"


def synthetic_text(n_words: int = 3000, seed: int = 0) -> str:
    """Repetitive English-like text with some non-ASCII, so BPE learns merges quickly."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 10):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(10)) + rng.choice([".", "!", " — café", " ü"]))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tok")
    files = []
    for i in range(3):
        f = d / f"part{i}.txt"
        f.write_text(synthetic_text(seed=i), encoding="utf-8")
        files.append(f)
    return Tokenizer.train_bpe(files, vocab_size=400)


def test_train_bpe_vocab_and_eos(bpe: Tokenizer) -> None:
    assert 257 < bpe.vocab_size <= 400
    assert bpe.backend.token_to_id(EOS_TOKEN) == bpe.eos_id
    assert bpe.bos_id is None
    # Merges were learned: a frequent word is a single token.
    assert len(bpe.encode(" quick")) == 1


@pytest.mark.parametrize("text", [SAMPLE, synthetic_text(200, seed=9), "", " ", "\x00\x01 ÿ"])
def test_round_trip(bpe: Tokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_literal_eos_text_is_not_the_eos_token(bpe: Tokenizer) -> None:
    ids = bpe.encode("a <|endoftext|> b")
    assert bpe.eos_id not in ids
    assert bpe.decode([*ids, bpe.eos_id]).endswith(EOS_TOKEN)


def test_encode_batch_matches_encode(bpe: Tokenizer) -> None:
    texts = [SAMPLE, "hello", "", synthetic_text(50, seed=3)]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


@pytest.mark.parametrize("text", [SAMPLE, synthetic_text(300, seed=5)])
def test_token_byte_lengths_are_exact(bpe: Tokenizer, text: str) -> None:
    lengths = bpe.token_byte_lengths()
    assert lengths.dtype == np.int64 and lengths.shape == (bpe.vocab_size,)
    assert lengths[bpe.eos_id] == 0
    assert int(lengths[bpe.encode(text)].sum()) == len(text.encode("utf-8"))


def test_fingerprint_stable_across_save_load(bpe: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tokenizer.json"
    bpe.save(path)
    assert not path.with_name("tokenizer.json.tmp").exists()
    loaded = Tokenizer.from_file(path)
    assert loaded.fingerprint == bpe.fingerprint
    assert len(bpe.fingerprint) == 16 and int(bpe.fingerprint, 16) >= 0
    assert loaded.encode(SAMPLE) == bpe.encode(SAMPLE)
    assert (loaded.vocab_size, loaded.eos_id) == (bpe.vocab_size, bpe.eos_id)
    # A directory holding tokenizer.json is accepted too.
    assert Tokenizer.from_file(path.parent).fingerprint == bpe.fingerprint
    assert Tokenizer.byte_level().fingerprint != bpe.fingerprint


def test_train_from_iterator_is_deterministic() -> None:
    texts = [synthetic_text(500, seed=s) for s in range(3)]
    a = Tokenizer.train_bpe_from_iterator(texts, 350)
    b = Tokenizer.train_bpe_from_iterator(iter(texts), 350)
    assert a.fingerprint == b.fingerprint


def test_byte_level_fallback() -> None:
    tok = Tokenizer.byte_level()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.encode(SAMPLE) == list(SAMPLE.encode("utf-8"))
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    lengths = tok.token_byte_lengths()
    assert lengths[:256].tolist() == [1] * 256 and lengths[256] == 0


def test_vocab_too_small() -> None:
    with pytest.raises(UserError, match="at least 257"):
        Tokenizer.train_bpe_from_iterator(["abc"], 100)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.train_bpe([tmp_path / "missing.txt"], 300)


def test_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="Could not read tokenizer"):
        Tokenizer.from_file(bad)


def test_tokenizer_without_eos(tmp_path: Path) -> None:
    hf = HFTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="end-of-document"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_eos_from_tokenizer_config(tmp_path: Path) -> None:
    hf = HFTokenizer(models.WordLevel({"a": 0, "<s>": 1, "[END]": 2, "[UNK]": 3}, unk_token="[UNK]"))
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "[END]"}}))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.eos_id, tok.bos_id, tok.vocab_size) == (2, 1, 4)
