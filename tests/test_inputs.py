"""Inputs checked before a run writes anything (issue 22): the tokenizer against the shards'
manifest, a training split too small for a step or for GPTQ's calibration, a preset that is
not there, a foreign artifact, and the collective timeout handed to the process group."""

import datetime
import json
import pickle
import shutil

import pytest
import torch

import train_gpt as tg
from tests.conftest import DEMO, tiny_env
from tools._files import shard_bytes


def copy_corpus(small_root, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(small_root / "data", root / "data")
    return root


def test_a_tokenizer_other_than_the_manifests_is_refused(small_root, tmp_path):
    root = copy_corpus(small_root, tmp_path)
    cfg = tg.Config.from_env(tiny_env(root, "tok"))
    assert tg.check_tokenizer_hash(cfg.data) == []  # the manifest's own tokenizer passes
    manifest = root / DEMO / "manifest.json"
    meta = json.loads(manifest.read_text())
    meta["tokenizer"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(meta))
    with pytest.raises(tg.ConfigError, match=r"TOKENIZER_PATH=.* is not the tokenizer of "
                                             r"DATA_PATH's shards .*manifest\.json: sha256 000000"):
        tg.load_data(cfg, tg.Runtime(), training=False)
    manifest.unlink()  # no manifest: not compared, and the run says so
    assert tg.check_tokenizer_hash(cfg.data) == [
        f"WARNING: TOKENIZER_PATH is unchecked: no tokenizer sha256 in {manifest}"]


def test_a_split_smaller_than_a_step_or_than_gptqs_calibration_warns(small_root, tmp_path):
    root = copy_corpus(small_root, tmp_path)
    for old in (root / DEMO).glob("fineweb_train_*.bin"):
        old.unlink()
    tokens = torch.arange(3000).remainder(1024).numpy()
    (root / DEMO / "fineweb_train_000000.bin").write_bytes(shard_bytes(tokens))
    env = tiny_env(root, "small")
    _, warnings = tg.load_data(tg.Config.from_env(env), tg.Runtime(), training=True)
    assert warnings == []  # 3,000 tokens hold a step of 2,048 (plus the one target each rank adds)
    env["TRAIN_BATCH_TOKENS"] = "4096"
    _, warnings = tg.load_data(tg.Config.from_env(env), tg.Runtime(), training=True)
    assert warnings == ["WARNING: the training split holds 3000 tokens, less than one step "
                        "(4096): every step repeats it"]
    env.update(TRAIN_BATCH_TOKENS="2048", GPTQ_ENABLED="1", GPTQ_CALIBRATION_BATCHES="2")
    _, warnings = tg.load_data(tg.Config.from_env(env), tg.Runtime(), training=True)
    assert warnings == ["WARNING: GPTQ's calibration reads 4098 tokens; the training split "
                        "holds 3000, so it repeats them"]


def test_a_missing_preset_says_where_presets_are_read():
    with pytest.raises(tg.ConfigError) as e:
        tg.Config.from_env({"PRESET": "nosuch"})
    folder = tg.Path(tg.__file__).resolve().with_name("presets")
    assert str(e.value) == (f"PRESET='nosuch' is not allowed; expected one of: demo, legal "
                            f"(or unset); "
                            f"presets are read from {folder}")


def test_a_foreign_artifact_is_named_without_torchs_unsafe_loading_advice(tmp_path):
    import lzma

    path = tmp_path / "foreign.ptz"
    path.write_bytes(lzma.compress(pickle.dumps({"w": object()})))  # xz, but not our container
    with pytest.raises(tg.ConfigError) as e:
        tg.read_artifact(path)
    message = str(e.value)
    assert message.startswith(f"{path}: not an artifact of this project")
    assert "weights_only" not in message and "\n" not in message
    path.write_bytes(b"PK\x03\x04 a zip, say")
    with pytest.raises(tg.ConfigError, match=r"not an artifact of this project \(no xz or brotli"):
        tg.read_artifact(path)


def test_the_collective_timeout_reaches_the_process_group(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in (("RANK", "0"), ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)  # torchrun's
    monkeypatch.setattr(tg.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(tg.dist, "init_process_group", lambda **kw: seen.update(kw))
    threads = torch.get_num_threads()
    try:
        cfg = tg.Config.from_env({"DEVICE": "cpu", "COLLECTIVE_TIMEOUT_SECONDS": "7"})
        rt = tg.start_runtime(cfg.run)
    finally:
        torch.set_num_threads(threads)
    assert (rt.rank, rt.world_size) == (0, 2)
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(seconds=7)
    default = tg.Config.from_env({}).run.collective_timeout_seconds
    assert default == 300.0  # minutes, not gloo's half hour
