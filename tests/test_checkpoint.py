"""The run directory is a self-describing checkpoint: JSON + safetensors, atomic, no pickle."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from ping_llm import __version__
from ping_llm import checkpoint as ck
from ping_llm.config import TrainConfig
from ping_llm.data.markov import SyntheticLoader
from ping_llm.errors import InputError
from ping_llm.model import GPT, GPTConfig
from ping_llm.optim import build_optimizers
from ping_llm.train import train

MODEL = dict(n_layer=2, n_embd=64, n_head=2, sequence_len=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(run_dir, steps=3, **kw):
    cfg = TrainConfig(out_dir=str(run_dir), model=MODEL, steps=steps, device_batch_size=2,
                      eval_every=0, log_every=1, save_every=0, **{"knowledge": False, **kw})
    return train(cfg, loader=SyntheticLoader(2, 64))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    _train(d)
    return d


def test_run_dir_layout_is_plain_json_and_safetensors(run_dir):
    assert (run_dir / "config.json").is_file() and (run_dir / "metrics.jsonl").is_file()
    ckpt = run_dir / "checkpoint"
    names = {p.name for p in ckpt.iterdir()}
    assert names == {"meta.json", "config.json", "model.safetensors", "optimizer.safetensors",
                     "optimizer.json", "loader.json", "rng.json"}
    assert not (run_dir / "checkpoint.tmp").exists() and not (run_dir / "checkpoint.old").exists()

    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["format"] == "ping-llm-checkpoint" and meta["format_version"] == ck.FORMAT_VERSION
    assert meta["ping_llm_version"] == __version__ and meta["step"] == 3
    assert set(meta["files"]) == names
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model"]["n_layer"] == 2 and config["model"]["vocab_size"] == 267
    assert config["train"]["steps"] == 3 and config["train"]["model"] == MODEL
    assert json.loads((run_dir / "config.json").read_text()) == config
    loader = json.loads((ckpt / "loader.json").read_text())
    assert loader == {"world_size": 1, "ranks": [
        {"kind": "synthetic", "seed": 0, "split": "train", "next_local": 3}]}

    # The weights are exactly the GPT's state_dict, readable by any safetensors reader.
    expected = GPT(GPTConfig.from_dict(config["model"])).state_dict()
    with safetensors.safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            assert f.get_tensor(k).shape == expected[k].shape
            assert f.get_tensor(k).dtype == torch.float32

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


def test_no_file_is_a_pickle_and_loading_never_unpickles(run_dir, monkeypatch):
    for p in run_dir.rglob("*"):
        if p.is_file():
            head = p.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", f"{p} looks like a pickle/torch.save"

    def refuse(*a, **k):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    c = ck.load_checkpoint(run_dir)
    model, config = ck.load_model(run_dir)
    assert c.step == 3 and isinstance(config, GPTConfig) and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, c.model_state[k])


def test_load_model_accepts_the_checkpoint_dir_and_predicts_like_the_trained_weights(run_dir):
    m1, c1 = ck.load_model(run_dir)
    m2, c2 = ck.load_model(run_dir / "checkpoint")
    assert c1 == c2
    ref = GPT(c1)
    ref.load_state_dict(safetensors.torch.load_file(str(run_dir / "checkpoint/model.safetensors")))
    x = torch.randint(0, 267, (2, 16))
    with torch.no_grad():
        assert torch.equal(m1(x)[0], ref(x)[0]) and torch.equal(m2(x)[0], ref(x)[0])


def test_missing_or_foreign_checkpoint_is_a_clear_input_error(tmp_path):
    with pytest.raises(InputError, match="no ping-llm checkpoint"):
        ck.load_model(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError, match="not a ping-llm checkpoint"):
        ck.load_checkpoint(tmp_path)


def test_newer_format_version_is_refused(run_dir, tmp_path):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    meta = json.loads((d / "checkpoint/meta.json").read_text())
    meta["format_version"] = ck.FORMAT_VERSION + 1
    (d / "checkpoint/meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="upgrade ping-llm"):
        ck.load_model(d)


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _train(tmp_path, steps=2)
    before = ck.load_checkpoint(tmp_path)

    real_save_file = ck.save_file

    def disk_full_on_optimizer(tensors, path, **kw):  # the weights land, the optimizer does not
        if path.endswith("optimizer.safetensors"):
            raise OSError("No space left on device")
        return real_save_file(tensors, path, **kw)

    monkeypatch.setattr(ck, "save_file", disk_full_on_optimizer)
    with pytest.raises(OSError, match="No space"):
        _train(tmp_path, steps=4, resume=True)
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.tmp").exists()  # the torn save is there, and ignored
    after = ck.load_checkpoint(tmp_path)
    assert after.step == 2 and after.path == tmp_path / "checkpoint"
    for k in before.model_state:
        assert torch.equal(before.model_state[k], after.model_state[k])

    _train(tmp_path, steps=4, resume=True)  # the next save cleans up and replaces it
    assert ck.load_checkpoint(tmp_path).step == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "config.json",
                                                           "metrics.jsonl", "train.lock"]


def test_crash_between_the_two_renames_falls_back_to_the_old_checkpoint(tmp_path):
    _train(tmp_path, steps=2)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # state after the 1st rename
    assert ck.find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    assert ck.load_checkpoint(tmp_path).step == 2
    _train(tmp_path, steps=3, resume=True)
    assert ck.load_checkpoint(tmp_path).path == tmp_path / "checkpoint"
    assert not (tmp_path / "checkpoint.old").exists()


def test_optimizer_state_round_trips_exactly_through_safetensors_and_json():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    opts = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                            weight_decay=0.1)
    x = torch.randint(0, 267, (2, 64))
    for _ in range(2):
        model(x, x)[1].backward()
        for o in opts:
            o.step()
        model.zero_grad()
    tensors, described = ck.optimizer_state_to_files(opts)
    json.loads(json.dumps(described))  # JSON-able as is

    fresh = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                             weight_decay=0.1)
    ck.optimizer_state_from_files(fresh, tensors, described)
    for a, b in zip(opts, fresh, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa["param_groups"] == sb["param_groups"]  # incl. betas back as a tuple
        assert sa["state"].keys() == sb["state"].keys()
        for pid in sa["state"]:
            for name, v in sa["state"][pid].items():
                w = sb["state"][pid][name]
                assert torch.equal(v, w) if torch.is_tensor(v) else v == w


def test_rng_states_round_trip_for_torch_numpy_and_python():
    torch.manual_seed(1)
    np.random.seed(2)  # noqa: NPY002 (the legacy global state is what we save)
    random.seed(3)
    state = json.loads(json.dumps(ck.capture_rng_state()))
    first = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    ck.restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_truncate_metrics_drops_records_after_the_resume_step(tmp_path):
    for s in range(1, 6):
        ck.append_metrics(tmp_path, {"kind": "train", "step": s})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # torn line from a crash
    ck.truncate_metrics(tmp_path, 3)
    assert [r["step"] for r in ck.read_metrics(tmp_path)] == [1, 2, 3]


def test_a_damaged_weights_file_is_named_in_a_one_line_error(run_dir, tmp_path):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    weights = d / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a cut-off copy
    for load in (ck.load_model, ck.load_checkpoint):  # queries / eval, and --resume
        with pytest.raises(InputError, match=r"model\.safetensors is damaged"):
            load(d)


# ------------------------------------------------------------------------------------------------
# one trainer per run directory


def test_a_second_trainer_of_the_same_run_is_refused_with_the_holder_s_pid(tmp_path):
    import os

    held = ck.RunLock(tmp_path)
    held.acquire()
    try:
        with pytest.raises(InputError, match=rf"another trainer \(pid {os.getpid()}\)"):
            _train(tmp_path, steps=1)
        assert ck.find_checkpoint(tmp_path) is None  # it wrote nothing
    finally:
        held.release()
    _train(tmp_path, steps=1)  # released: the run can be trained
    assert ck.find_checkpoint(tmp_path) is not None


def test_the_lock_dies_with_its_process(tmp_path):
    import subprocess
    import sys

    code = ("import sys, os; from ping_llm.checkpoint import RunLock; "
            "RunLock(sys.argv[1]).acquire(); os.kill(os.getpid(), 9)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    assert r.returncode == -9 and (tmp_path / ck.LOCK_FILE).read_text().strip().isdigit()
    lock = ck.RunLock(tmp_path)
    lock.acquire()  # no stale lock after kill -9
    lock.release()
