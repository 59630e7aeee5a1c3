"""CheckpointManager in one process: atomic layout, checksums, corruption handling, retention, config checks."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from bigtrain.checkpoint.config import CheckpointConfig
from bigtrain.checkpoint.manager import CheckpointManager, config_changes, resolve_resume, verify
from bigtrain.checkpoint.manifest import read_manifest
from bigtrain.checkpoint.rank_state import capture_rng
from bigtrain.config import load_config
from bigtrain.errors import UserError
from bigtrain.messages import capture
from bigtrain.model import ModelConfig, build_on_meta
from bigtrain.optim.optimizer import build_adamw
from bigtrain.parallel.dist import DistInfo
from bigtrain.parallel.single import SingleStrategy
from bigtrain.sections import ConfigError

CFG = ModelConfig(vocab_size=128, dim=32, num_layers=1, num_heads=2, max_seq_len=16)
CONFIG = load_config(None, ["model.vocab_size=128", "model.dim=32", "model.num_layers=1", "model.num_heads=2",
                            "model.max_seq_len=16", "data.seq_len=16", "train.global_batch_tokens=64",
                            "train.micro_batch_size=4"]).to_dict()


def make(seed: int = 0):
    strategy = SingleStrategy(DistInfo(0, 0, 1, torch.device("cpu")), "fp32")
    def optimizer(m):
        return build_adamw(m, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)

    return (strategy, *strategy.wrap(build_on_meta(CFG), optimizer, seed=seed))


def train_steps(model, optimizer, n: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        tokens = torch.randint(0, CFG.vocab_size, (2, 9), generator=gen)
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def save(manager: CheckpointManager, step: int, parts, *, blocking: bool = True, config=CONFIG) -> Path:
    strategy, model, optimizer = parts
    path = manager.save(step, strategy=strategy, model=model, optimizer=optimizer,
                        rank_state={"data": {"next_sample": step}, "rng": capture_rng()},
                        tokens_seen=step * 64, config=config, config_hash="h", blocking=blocking)
    manager.wait()
    return path


@pytest.fixture()
def trained():
    parts = make()
    train_steps(parts[1], parts[2], 2)
    return parts


def load_into_fresh(manager: CheckpointManager, path: Path, *, auto: bool = False, config=CONFIG):
    fresh = make(seed=123)
    resumed = manager.load(path, strategy=fresh[0], model=fresh[1], optimizer=fresh[2], current_config=config,
                           seed=0, auto=auto)
    return resumed, fresh


@pytest.mark.parametrize("blocking", [True, False])
def test_save_commits_atomically_and_loads_exactly(tmp_path: Path, trained, blocking: bool) -> None:
    manager = CheckpointManager(tmp_path, CheckpointConfig())
    path = save(manager, 3, trained, blocking=blocking)
    assert path == tmp_path / "checkpoints" / "step_000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000003"
    manifest, problems = verify(path)
    assert not problems and manifest is not None
    assert manifest.step == 3 and manifest.tokens_seen == 192 and manifest.world_size == 1 and manifest.backend == "dcp"
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "rank/rank_00000.pt"} <= set(manifest.files)
    assert all(len(f["crc32"]) == 8 and f["size"] > 0 for f in manifest.files.values())

    resumed, (_, model, optimizer) = load_into_fresh(manager, path)
    assert resumed is not None and resumed.step == 3 and resumed.data_state == {"next_sample": 3}
    _, ref_model, ref_opt = trained
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ref_state, state = ref_opt.state_dict()["state"], optimizer.state_dict()["state"]
    assert ref_state.keys() == state.keys()
    for i in ref_state:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_state[i][key], state[i][key]), (i, key)
    # The optimizer hyperparameters of the resuming run win (the trainer warns about changes).
    assert [g["weight_decay"] for g in optimizer.param_groups] == [g["weight_decay"] for g in ref_opt.param_groups]


def _corrupt(ckpt: Path, how: str) -> str:
    shard = ckpt / "dcp" / "__0_0.distcp"
    if how == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        return "checksum"
    if how == "truncate":
        with open(shard, "r+b") as fh:
            fh.truncate(shard.stat().st_size - 10)
        return "size"
    (ckpt / "manifest.json").unlink()
    return "manifest.json: missing"


@pytest.mark.parametrize("how", ["flip", "truncate", "delete_manifest"])
def test_corrupt_checkpoint_is_reported_and_skipped(tmp_path: Path, trained, how: str) -> None:
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=5))
    save(manager, 1, trained)
    train_steps(trained[1], trained[2], 1)
    bad = save(manager, 2, trained)
    words = _corrupt(bad, how)

    _, problems = verify(bad)
    assert problems and words in problems[0] and str(bad) in problems[0], problems
    if how != "delete_manifest":
        # The cheap pass (sizes) catches truncation; checksums catch flipped bytes.
        assert (manager.latest(checksums=True) == tmp_path / "checkpoints" / "step_000001")
    else:
        assert manager.latest() == tmp_path / "checkpoints" / "step_000001"
    with capture() as lines:
        resumed, _ = load_into_fresh(manager, bad, auto=True)
    assert resumed is not None and resumed.step == 1
    assert any(str(bad) in m and "skipping" in m for m in lines), lines
    with pytest.raises(UserError, match="corrupt or incomplete"):
        load_into_fresh(manager, bad, auto=False)


def test_retention_keeps_last_and_milestones(tmp_path: Path, trained) -> None:
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=2, keep_every_steps=3))
    for step in range(1, 8):
        save(manager, step, trained, blocking=step % 2 == 0)
    assert [p.name for p in manager.list()] == ["step_000003", "step_000006", "step_000007"]


def test_crash_leftovers_are_ignored_and_cleaned(tmp_path: Path, trained) -> None:
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=5))
    save(manager, 2, trained)
    root = tmp_path / "checkpoints"
    (root / "step_000004.tmp" / "dcp").mkdir(parents=True)  # crashed before the manifest
    shutil.copytree(root / "step_000002", root / "step_000003")  # crashed after rename, before `latest`
    json_path = root / "step_000003" / "manifest.json"
    json_path.write_text(json_path.read_text().replace('"step": 2', '"step": 3'))
    assert manager.latest() == root / "step_000002"
    assert resolve_resume("auto", tmp_path) == root / "step_000002"
    save(manager, 5, trained)
    assert not (root / "step_000004.tmp").exists()


def test_config_changes_split_architecture_from_settings() -> None:
    saved = json.loads(json.dumps(CONFIG))
    current = json.loads(json.dumps(CONFIG))
    current["model"]["dim"] = 64
    current["model"]["preset"] = "debug"
    current["train"]["lr"] = 0.5
    current["parallel"]["strategy"] = "fsdp"
    arch, soft = config_changes(saved, current)
    assert arch == ["model.dim: 32 -> 64"]
    assert len(soft) == 1 and soft[0].startswith("train.lr:")


def test_loss_weights_are_training_settings_not_architecture() -> None:
    """model.z_loss and the MoE loss weights may change at a resume (reported); the expert count may not."""
    saved = json.loads(json.dumps(CONFIG))
    saved["model"]["moe"] = {"num_experts": 4, "top_k": 2, "router_z_loss": 0.0, "aux_loss_weight": 0.01}
    current = json.loads(json.dumps(saved))
    current["model"]["z_loss"] = 1e-4
    current["model"]["moe"].update(router_z_loss=1e-3, aux_loss_weight=0.02)
    arch, soft = config_changes(saved, current)
    assert arch == []
    assert [line.split(":")[0] for line in soft] == ["model.moe.aux_loss_weight", "model.moe.router_z_loss",
                                                     "model.z_loss"]
    current["model"]["moe"]["num_experts"] = 8
    assert config_changes(saved, current)[0] == ["model.moe.num_experts: 4 -> 8"]


def test_keys_added_after_a_checkpoint_compare_as_their_defaults() -> None:
    """A checkpoint written before model.qk_norm / train.optimizer existed trained with their defaults."""
    from bigtrain.checkpoint.manager import check_config
    from bigtrain.train.run_config import RunConfig

    defaults = RunConfig().to_dict()
    saved = json.loads(json.dumps(CONFIG))
    for section, key in (("model", "qk_norm"), ("train", "optimizer")):
        saved[section].pop(key, None)
    current = json.loads(json.dumps(saved))
    current["model"]["qk_norm"], current["train"]["optimizer"] = False, "adamw"
    assert config_changes(saved, current, defaults) == ([], [])
    current["model"]["qk_norm"] = True  # not the default: the architecture did change
    assert config_changes(saved, current, defaults)[0] == ["model.qk_norm: False -> True"]
    current["model"]["qk_norm"], current["train"]["optimizer"] = False, "muon"
    with pytest.raises(UserError, match=r"the optimizer changed \(train.optimizer: 'adamw' -> 'muon'\)"):
        check_config(Path("ckpt"), saved, current, defaults)


def test_changed_architecture_is_refused_with_a_diff(tmp_path: Path, trained) -> None:
    manager = CheckpointManager(tmp_path, CheckpointConfig())
    path = save(manager, 1, trained)
    changed = json.loads(json.dumps(CONFIG))
    changed["model"]["num_layers"] = 2
    with pytest.raises(UserError, match=r"model architecture changed:\n  model.num_layers: 1 -> 2"):
        load_into_fresh(manager, path, config=changed)


def test_resolve_resume_bad_input(tmp_path: Path, trained) -> None:
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing saved yet: start fresh
    with pytest.raises(UserError, match="does not exist; pass a checkpoint folder"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    manager = CheckpointManager(tmp_path, CheckpointConfig())
    path = save(manager, 1, trained)
    assert resolve_resume(str(path), tmp_path) == path
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == path
    os.remove(path / "manifest.json")
    with pytest.raises(UserError, match="never committed"):
        resolve_resume(str(path), tmp_path)


def test_manifest_records_config(tmp_path: Path, trained) -> None:
    manager = CheckpointManager(tmp_path, CheckpointConfig())
    path = save(manager, 1, trained)
    assert read_manifest(path).config == CONFIG


@pytest.mark.parametrize("override,words", [
    ("checkpoint.keep_every_steps=-1", "keep_every_steps"),
    ("checkpoint.keep_last=0", "keep_last"),
])
def test_bad_checkpoint_config(override: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(None, [override])


def test_stage_freezes_a_snapshot_and_reuses_buffers() -> None:
    from collections import OrderedDict

    from bigtrain.checkpoint.staging import stage

    class Scaler:  # stands in for DeepSpeed's loss scaler: a mutable non-tensor leaf
        def __init__(self) -> None:
            self.scale = 1.0

    flat = torch.arange(10.0)
    scaler = Scaler()
    state = {"module": OrderedDict(w=flat[2:4]), "shapes": [torch.Size([2])], "scaler": scaler, "step": 3}
    cache: dict[str, torch.Tensor] = {}
    snap = stage(state, cache, "zero/file.pt:")
    flat.add_(100)
    scaler.scale = 2.0
    assert isinstance(snap["module"], OrderedDict) and snap["shapes"] == [torch.Size([2])]
    assert snap["module"]["w"].tolist() == [2.0, 3.0] and snap["module"]["w"].untyped_storage().nbytes() == 8
    assert snap["scaler"].scale == 1.0 and snap["step"] == 3
    again = stage(state, cache, "zero/file.pt:")
    assert again["module"]["w"].data_ptr() == snap["module"]["w"].data_ptr()  # same host buffer, no new allocation
    assert again["module"]["w"].tolist() == [102.0, 103.0]


def test_deepspeed_engine_wrapper_defers_writes(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from bigtrain.checkpoint.deepspeed import StagingCheckpointEngine

    class Inner:  # DeepSpeed's TorchCheckpointEngine, reduced to what the wrapper touches
        def create(self, info):
            self.created = info.tag

        def save(self, state, path):
            torch.save(state, path)

        def is_decoupled(self):
            return False

    engine = StagingCheckpointEngine(Inner())
    engine.create(SimpleNamespace(save_dir=str(tmp_path), tag="state"))
    weights = torch.ones(3)
    engine.staging = True
    engine.save({"w": weights}, str(tmp_path / "a.pt"))
    weights.zero_()  # the next training step changes the weights before the background write
    assert not (tmp_path / "a.pt").exists() and engine.is_decoupled() is False
    engine.write_pending()
    assert torch.equal(torch.load(tmp_path / "a.pt")["w"], torch.ones(3))
    engine.staging = False
    engine.save({"w": weights}, str(tmp_path / "b.pt"))  # not staging: written at once
    assert torch.equal(torch.load(tmp_path / "b.pt")["w"], torch.zeros(3))
