"""The exported tokenizer conditions a prompt as bigtrain does: ``tok(prompt)`` puts the document-start token
(bigtrain's EOS, ``<|endoftext|>``) before the prompt, as ``bigtrain generate`` and training do, so greedy
``model.generate`` in transformers continues the prompt token for token like bigtrain's greedy sampling.

Tiny models (dim 64) with the demo tokenizer, built by the trainer and saved at step 0, for each exported
architecture (Llama, Qwen3, Mixtral, Qwen3-MoE); no hub access (tests/conftest.py sets HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from bigtrain.data.tokenizer import Tokenizer
from bigtrain.export import export_checkpoint
from bigtrain.generate import load_for_generation
from bigtrain.model.sampling import generate
from tests.helpers import build_trainer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SHAPE = {"vocab_size": 4096, "dim": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_dim": 128,
         "max_seq_len": 128, "tie_embeddings": False, "rope_theta": 10000.0, "norm_eps": 1e-5}
MOE = {"num_experts": 4, "top_k": 2, "expert_hidden_dim": 32}
RUN = ["data.seq_len=128", "train.global_batch_tokens=1024", "train.micro_batch_size=4", "train.max_steps=1",
       "eval.every_steps=0", "eval.at_end=false", "log.sample_at_end=false", "log.console=false", "run.device=cpu",
       "train.precision=fp32", "checkpoint.at_end=false", "run.num_threads=2"]
ARCHITECTURES = {  # exported architecture -> model overrides
    "LlamaForCausalLM": ["model.qk_norm=false"],
    "Qwen3ForCausalLM": ["model.qk_norm=true"],
    "MixtralForCausalLM": ["model.qk_norm=false", *(f"model.moe.{k}={v}" for k, v in MOE.items())],
    "Qwen3MoeForCausalLM": ["model.qk_norm=true", *(f"model.moe.{k}={v}" for k, v in MOE.items())],
}
PROMPTS = ["ROMEO:", "First Citizen:\nWe are accounted poor citizens", ""]


class RecordingCodec:
    """bigtrain's tokenizer, remembering the ids that generate() decodes (its new tokens)."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []

    @property
    def eos_id(self) -> int:
        return self.tok.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        self.ids = [int(i) for i in ids]
        return self.tok.decode(ids)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint(out: Path, arch_overrides: list[str]) -> Path:
    """A run of SHAPE with the demo tokenizer, its weights made non-trivial (norm gains around 1, the
    rest scaled up so logits are well apart and greedy choices are clear-cut), saved at step 0."""
    model = [f"model.{k}={v}" for k, v in SHAPE.items()]
    trainer = build_trainer("configs/debug.yaml", [f"run.out_dir={out}", *model, *arch_overrides, *RUN])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
            else:
                p.mul_(4.0)
    return Path(trainer.save_checkpoint(blocking=True))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_exported_tokenizer_adds_document_start_and_greedy_matches(arch: str, tmp_path: Path, demo_data: Path) -> None:
    run_tokenizer = demo_data / "tokenizer.json"
    before = _sha256(run_tokenizer)
    ckpt = _checkpoint(tmp_path / "run", ARCHITECTURES[arch])
    out = export_checkpoint(ckpt, "hf", tmp_path / "hf")
    assert _sha256(run_tokenizer) == before  # the run's own tokenizer is never modified

    ours = Tokenizer.from_file(run_tokenizer)
    doc_start = ours.eos_id  # bigtrain starts a document (and a prompt) with EOS
    assert ours.eos_token == "<|endoftext|>"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch]
    assert config["bos_token_id"] == config["eos_token_id"] == doc_start

    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf_model).__name__ == arch
    # The tokenizers library alone (no tokenizer_config.json) adds it too: it is in tokenizer.json.
    plain = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    model, bigtrain_tok = load_for_generation(ckpt)
    for prompt in PROMPTS:
        expected = [doc_start, *(ours.encode(prompt) if prompt else [])]
        assert tok(prompt)["input_ids"] == expected, prompt
        assert plain.encode(prompt).ids == expected, prompt
        assert tok.decode(expected, skip_special_tokens=True) == prompt

        codec = RecordingCodec(bigtrain_tok)
        text = generate(model, codec, prompt, max_new_tokens=8, temperature=0.0)
        inputs = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            output = hf_model.generate(**inputs, do_sample=False, max_new_tokens=8)
        new = output[0, inputs["input_ids"].shape[1]:].tolist()
        if new and new[-1] == doc_start:  # transformers keeps the EOS it stops at; bigtrain drops it
            new = new[:-1]
        assert len(codec.ids) > 0 and new == codec.ids, (prompt, new, codec.ids)
        assert tok.decode(output[0], skip_special_tokens=True) == prompt + text
    # As Llama tokenizers declare it:
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == tok_config["eos_token"] == "<|endoftext|>"
    assert tok_config["add_bos_token"] is True and tok_config["add_eos_token"] is False


def test_literal_special_token_text_is_text(tmp_path: Path, demo_data: Path) -> None:
    """bigtrain encodes a literal "<|endoftext|>" in a prompt as ordinary text; so does the exported tokenizer."""
    ckpt = _checkpoint(tmp_path / "run", ARCHITECTURES["LlamaForCausalLM"])
    out = export_checkpoint(ckpt, "hf", tmp_path / "hf")
    ours = Tokenizer.from_file(demo_data / "tokenizer.json")
    tok: Any = transformers.AutoTokenizer.from_pretrained(str(out))
    prompt = "JULIET:<|endoftext|>ROMEO:"
    assert tok(prompt)["input_ids"] == [ours.eos_id, *ours.encode(prompt)]
