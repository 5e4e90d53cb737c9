"""The training loop: exact resume, DDP == accumulation, preemption, divergence, fixed eval set.

Most tests train a 2-layer, 64-wide model on 64-token contexts from `SyntheticLoader` (a seeded
sparse Markov chain that follows the loader contract), which takes ~10-20 ms per step here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ping_llm import checkpoint as ck
from ping_llm.cli import main as cli_main
from ping_llm.config import TrainConfig, config_for_run, grad_accum_steps
from ping_llm.data.markov import SyntheticLoader
from ping_llm.errors import InputError
from ping_llm.model import GPT
from ping_llm.train import TrainingDiverged, train

MODEL = dict(n_layer=2, n_embd=64, n_head=2, sequence_len=64)
B, T = 4, 64
REPO = Path(__file__).resolve().parents[1]

# A training process as torchrun would start it: config JSON in argv, rank from the environment.
DRIVER = """
import json, os, sys
import torch
torch.set_num_threads(1)
from ping_llm.config import TrainConfig
from ping_llm.data.markov import SyntheticLoader
from ping_llm.train import train
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
T = cfg.gpt_config().sequence_len
mk = lambda split: SyntheticLoader(cfg.device_batch_size, T, split=split, rank=rank,
                                   world_size=world)
summary = train(cfg, loader=mk("train"), eval_loader=mk("val"))
if rank == 0:
    print("SUMMARY " + json.dumps(summary), flush=True)
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out_dir, **kw) -> TrainConfig:
    # The training loop's mechanics, on random tokens: no address knowledge (test_knowledge.py)
    base = dict(out_dir=str(out_dir), model=MODEL, steps=12, device_batch_size=B, eval_every=4,
                eval_batches=4, log_every=1, save_every=5, knowledge=False)
    return TrainConfig(**{**base, **kw})


def _run(out_dir, **kw) -> dict:
    return train(_cfg(out_dir, **kw), loader=SyntheticLoader(B, T),
                 eval_loader=SyntheticLoader(B, T, split="val"))


def _assert_same_weights(a, b, exact=True, rtol=0.0, atol=0.0):
    sa, sb = ck.load_checkpoint(a).model_state, ck.load_checkpoint(b).model_state
    assert sa.keys() == sb.keys()
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=k)


def _curve(run_dir, kind="train", key="loss"):
    return [(r["step"], r[key]) for r in ck.read_metrics(run_dir) if r["kind"] == kind]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return {**env, **extra}


# ------------------------------------------------------------------------------------------------
# config


def test_config_rejects_bad_values_with_input_errors():
    for bad in (dict(steps=0), dict(device_batch_size=-1), dict(matrix_lr=float("nan")),
                dict(warmdown_frac=1.5), dict(dtype="float16"), dict(wandb="yes"),
                dict(preset="huge"), dict(eval_every=-1), dict(total_batch_tokens=0),
                dict(readdress_src=1.5), dict(readdress_dst=-0.1), dict(result_loss_weight=0),
                dict(result_loss_weight=float("inf"))):
        with pytest.raises(InputError):
            TrainConfig(**bad)
    with pytest.raises(InputError, match="unknown GPTConfig field"):
        TrainConfig(model={"n_layers": 2}).gpt_config()


def test_grad_accumulation_is_total_tokens_over_micro_batch_tokens_times_world():
    cfg = TrainConfig(device_batch_size=4, total_batch_tokens=4 * 64 * 2 * 6)
    assert grad_accum_steps(cfg, 64, world_size=1) == 12
    assert grad_accum_steps(cfg, 64, world_size=2) == 6
    assert grad_accum_steps(TrainConfig(device_batch_size=4), 64, world_size=8) == 1
    with pytest.raises(InputError, match="not a multiple"):
        grad_accum_steps(cfg, 64, world_size=5)


def test_synthetic_loader_shards_micro_batches_by_rank_and_resumes_from_its_state():
    one = SyntheticLoader(B, T)
    r0, r1 = SyntheticLoader(B, T, rank=0, world_size=2), SyntheticLoader(B, T, rank=1,
                                                                          world_size=2)
    for _ in range(3):  # global micro-batches 2i (rank 0) and 2i+1 (rank 1)
        for shard in (r0, r1):
            x, y = next(shard)
            ex, ey = next(one)
            assert torch.equal(x, ex) and torch.equal(y, ey)
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
            has_target = y[:, :-1] != -1  # targets are the inputs shifted by one
            assert torch.equal(x[:, 1:][has_target], y[:, :-1][has_target])
    state = json.loads(json.dumps(r1.get_state()))
    want = next(r1)
    again = SyntheticLoader(B, T, rank=1, world_size=2)
    again.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(next(again), want, strict=True))


def test_refuses_to_overwrite_a_run_and_to_resume_with_another_model(tmp_path):
    _run(tmp_path, steps=2)
    with pytest.raises(InputError, match="pass --resume"):
        _run(tmp_path, steps=2)
    with pytest.raises(InputError, match="different model"):
        _run(tmp_path, steps=4, resume=True, model={**MODEL, "n_layer": 3})


def test_cli_config_for_resume_takes_the_checkpoints_settings_plus_new_options(tmp_path):
    _run(tmp_path, steps=2, seed=7, matrix_lr=0.01)
    cfg = config_for_run(tmp_path, resume=True, steps=9, preset=None)
    assert (cfg.seed, cfg.matrix_lr, cfg.steps, cfg.model) == (7, 0.01, 9, MODEL)
    changed = config_for_run(tmp_path, resume=True, model={"n_layer": 3})
    assert changed.model == {**MODEL, "n_layer": 3}  # one field changed, the others kept
    with pytest.raises(InputError, match="different model"):
        train(changed, loader=SyntheticLoader(B, T))
    assert config_for_run(tmp_path / "new", resume=True).seed == 0  # nothing to resume: defaults


def test_cli_train_without_a_prepared_dataset_exits_2(tmp_path, capsys):
    assert cli_main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "card.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the loop


def test_k_steps_then_resume_then_k_steps_is_bit_identical_to_2k_steps(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(straight, total_batch_tokens=2 * B * T)  # 2 micro-steps of accumulation
    s = _run(split, total_batch_tokens=2 * B * T, stop_at=6)
    assert (s["stopped"], s["step"], s["completed"]) == ("stop_at", 6, False)
    assert ck.load_checkpoint(split).step == 6
    s = _run(split, total_batch_tokens=2 * B * T, resume=True)
    assert (s["start_step"], s["step"], s["completed"]) == (6, 12, True)

    _assert_same_weights(straight, split, exact=True)
    a, b = ck.load_checkpoint(straight), ck.load_checkpoint(split)
    assert a.loader_states == b.loader_states == [
        {"kind": "synthetic", "seed": 0, "split": "train", "next_local": 24}]
    for k in a.optimizer_tensors:
        assert torch.equal(a.optimizer_tensors[k], b.optimizer_tensors[k]), k
    # metrics.jsonl of the resumed run reads as if it had never stopped
    assert _curve(straight) == _curve(split)
    assert _curve(straight, "eval", "eval_loss") == _curve(split, "eval", "eval_loss")


def test_eval_set_is_fixed_and_its_loss_is_the_token_weighted_mean(tmp_path):
    # With every lr at 0 the weights never change, so equal eval losses at every eval step mean
    # the eval batches never change either.
    s = _run(tmp_path, steps=6, eval_every=2, matrix_lr=0.0, embedding_lr=0.0, unembedding_lr=0)
    evals = _curve(tmp_path, "eval", "eval_loss")
    assert [st for st, _ in evals] == [0, 2, 4, 6]
    assert len({v for _, v in evals}) == 1

    torch.manual_seed(0)  # train() builds the model right after seeding with cfg.seed
    model = GPT(_cfg(tmp_path).gpt_config())
    val = SyntheticLoader(B, T, split="val")
    sums, counts = [], []
    with torch.no_grad():
        for _ in range(4):
            x, y = next(val)
            _, loss = model(x, y, loss_reduction="none")
            sums.append(loss.double().sum().item())  # the reference sums in float64
            counts.append((y != -1).sum().item())
    want = sum(sums) / sum(counts)
    # train() sums each batch's ~240 per-token losses in float32 (cross_entropy "sum", a cascade
    # sum: typically ~1e-7 relative, 2e-9 observed). The tolerance cannot be looser: the mean of
    # the per-batch means, the likeliest wrong formula, is only ~2.4e-6 away.
    assert math.isclose(evals[0][1], want, rel_tol=1e-6)
    assert math.isclose(s["final_eval_loss"], want, rel_tol=1e-6)
    per_batch_means = [a / c for a, c in zip(sums, counts, strict=True)]
    assert abs(sum(per_batch_means) / len(sums) / want - 1) > 1e-6  # ... outside the tolerance


def test_logs_loss_lr_grad_norm_throughput_and_mfu(tmp_path):
    s = _run(tmp_path, steps=4, peak_flops=1e12, warmup_steps=2, warmdown_frac=0.5)
    recs = [r for r in ck.read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["lr_mult"] for r in recs] == [0.0, 0.5, 1.0, 0.5]  # lr of the step just taken
    for r in recs:
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert r["mfu"] == pytest.approx(s["flops_per_token"] * r["tokens_per_s"] / 1e12)
    assert recs[-1]["tokens_seen"] == 4 * B * T
    assert s["mfu"] == pytest.approx(s["flops_per_token"] * s["tokens_per_s"] / 1e12)
    assert _run(tmp_path / "cpu", steps=1)["mfu"] is None  # no peak known for a CPU


class _SlowLoader(SyntheticLoader):
    """A machine that became slow: every micro-batch takes 40 ms more."""

    def __next__(self):
        time.sleep(0.04)
        return super().__next__()


def test_a_time_budget_ends_a_slowed_run_on_time_with_its_lr_decayed(tmp_path):
    # Planned for 5,000 steps; at >= 40 ms a step, 1.5 s of budget holds fewer than 40.
    cfg = _cfg(tmp_path, steps=5000, time_budget_s=1.5, warmdown_frac=0.5, save_every=0,
               eval_every=0)
    s = train(cfg, loader=_SlowLoader(B, T))
    assert s["completed"] and s["stopped"] is None and 3 <= s["step"] < 40
    lr = _curve(tmp_path, key="lr_mult")
    assert [st for st, _ in lr] == list(range(1, s["step"] + 1))
    assert lr[0][1] == 1.0 and lr[-1][1] == 0.0  # flat, then decayed to the end: on time
    # the decay followed time (the last half of it), not the 5,000 planned steps
    flat = [st for st, m in lr if m == 1.0]
    assert 0.25 * s["step"] <= len(flat) <= 0.75 * s["step"] + 1
    meta = ck.load_checkpoint(tmp_path).meta
    assert meta["step"] == s["step"] and meta["trainer"]["train_time_s"] >= 1.5
    again = train(dataclasses.replace(cfg, resume=True), loader=_SlowLoader(B, T))
    assert again["completed"] and again["step"] == s["step"]  # a spent budget stays spent


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    _run(tmp_path, steps=20, stop_at=4, eval_every=0)
    good = ck.load_checkpoint(tmp_path).model_state
    # An absurd learning rate blows the weights up in step 5; the loss of step 6 is NaN.
    with pytest.raises(TrainingDiverged, match=r"diverged in step 6.*non-finite.*step 4") as e:
        _run(tmp_path, steps=20, save_every=0, eval_every=0, resume=True,
             matrix_lr=1e30, embedding_lr=1e30, unembedding_lr=1e30)
    assert (e.value.step, e.value.checkpoint_step) == (6, 4)
    c = ck.load_checkpoint(tmp_path)
    assert c.step == 4 and all(torch.equal(good[k], c.model_state[k]) for k in good)
    assert all(torch.isfinite(v).all() for v in good.values())
    assert max(st for st, _ in _curve(tmp_path)) == 5  # step 5 was logged, never saved


def test_wandb_logging_works_offline_or_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match=r"pip install 'ping-llm\[wandb\]'"):
            _run(tmp_path, steps=2, wandb="offline")
        return
    s = _run(tmp_path, steps=2, wandb="offline")  # no network needed
    assert s["completed"] and any((tmp_path / "wandb").glob("offline-run-*"))
    assert ck.load_checkpoint(tmp_path).meta["trainer"]["wandb_id"]


# ------------------------------------------------------------------------------------------------
# processes: DDP and preemption


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_gloo_processes_matches_one_process_with_twice_the_accumulation(tmp_path):
    base = dict(model=MODEL, steps=6, device_batch_size=B, total_batch_tokens=4 * B * T,
                eval_every=3, eval_batches=4, log_every=1, save_every=0)
    one, two = tmp_path / "one", tmp_path / "two"
    port = _free_port()
    ranks = [  # 2 ranks x 2 micro-steps each (no_sync on the first)
        subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps({**base, "out_dir": str(two)})],
            env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    # Meanwhile, in this process: 1 rank x 4 micro-steps of accumulation.
    single = train(TrainConfig(**base, out_dir=str(one)), loader=SyntheticLoader(B, T),
                   eval_loader=SyntheticLoader(B, T, split="val"))
    assert (single["world_size"], single["grad_accum_steps"]) == (1, 4)
    outs = [p.communicate(timeout=240)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outs
    summary = json.loads(outs[0].split("SUMMARY ", 1)[1])
    assert (summary["world_size"], summary["grad_accum_steps"]) == (2, 2)

    # Same micro-batches per step; only the float summation order of gradients differs.
    tol = dict(rtol=1e-5, atol=1e-6)
    la, lb = _curve(one), _curve(two)
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 7))
    torch.testing.assert_close([v for _, v in la], [v for _, v in lb], **tol)
    ea, eb = _curve(one, "eval", "eval_loss"), _curve(two, "eval", "eval_loss")
    assert [s for s, _ in ea] == [s for s, _ in eb] == [0, 3, 6]
    torch.testing.assert_close([v for _, v in ea], [v for _, v in eb], **tol)
    # Weights: every tensor as a whole to 1e-5 relative (Frobenius; ~5e-7 observed), and each
    # element to rtol 1e-4 / atol 1e-5, except in the AdamW tensors (wte, lm_head: all but the
    # blocks' Muon matrices), atol 1e-3. AdamW divides each element's step by the RMS of its own
    # gradient, so for a rare token whose gradient is a few nearly cancelling terms, float32
    # summation-order rounding (~1e-7 of the terms) becomes ~1e-4 of a step of lr 0.69: one wte
    # element moved 9.7e-5 apart in 6 steps on one CPU (others: ~2e-7), 2x under the old atol.
    sa, sb = ck.load_checkpoint(one).model_state, ck.load_checkpoint(two).model_state
    assert sa.keys() == sb.keys()
    for k in sa:
        a, b = sa[k].double(), sb[k].double()
        assert (a - b).norm() <= 1e-5 * b.norm(), k
        atol = 1e-5 if k.startswith("transformer.h.") else 1e-3
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=k)
    ls = ck.load_checkpoint(two).loader_states
    assert [s["next_local"] for s in ls] == [12, 12]  # each rank read half of the 24 batches


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A small prepared dataset of the synthetic Internet (synth -> ingest -> prepare, ~3 s)."""
    d = tmp_path_factory.mktemp("data")
    for argv in (["synth", "--out", str(d / "s.jsonl.gz"), "--probes", "30", "--days", "0.5"],
                 ["ingest", str(d / "s.jsonl.gz"), "--out", str(d / "canon")],
                 ["prepare", str(d / "canon"), "--out", str(d / "prep")]):
        assert cli_main([*argv, "--no-progress"]) == 0, argv
    return d / "prep"


CLI_MODEL = ["--model", "n_layer=2", "--model", "n_embd=64", "--model", "n_head=2",
             "--model", "sequence_len=128", "--batch-size", "4", "--total-batch-tokens", "1024"]


def test_cli_train_runs_on_a_prepared_dataset_and_reports_json(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", str(prepared), "--out", str(run), *CLI_MODEL, "--steps", "4",
            "--eval-every", "2", "--eval-batches", "2", "--json"]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out)  # stdout is only the JSON summary
    assert summary["completed"] and summary["step"] == 4 and summary["grad_accum_steps"] == 2
    assert math.isfinite(summary["final_eval_loss"])
    model, config = ck.load_model(run)
    assert config.sequence_len == 128 and config.n_layer == 2
    assert cli_main(args) == 2  # the run exists: refuses to overwrite without --resume
    assert "--resume" in capsys.readouterr().err


def test_sigterm_finishes_the_step_saves_and_resume_replays_an_uninterrupted_run(prepared,
                                                                               tmp_path):
    run = tmp_path / "preempted"
    log = tmp_path / "log.txt"
    argv = [sys.executable, "-m", "ping_llm.cli", "train", "--data", str(prepared), "--out",
            str(run), *CLI_MODEL, "--steps", "100000", "--eval-every", "0", "--log-every", "1"]
    with open(log, "w") as f:
        p = subprocess.Popen(argv, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not any(s >= 5 for s, _ in _curve(run)):  # training is under way
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    out = log.read_text()
    assert p.returncode == 128 + signal.SIGTERM, out  # clean stop, reported as "by SIGTERM"
    assert "stopped (SIGTERM)" in out and "Traceback" not in out
    c = ck.load_checkpoint(run)
    k = c.step
    assert k >= 5 and _curve(run)[-1][0] == k  # the step in progress finished, logged, saved
    assert c.loader_states[0]["batches"] == 2 * k  # 2 micro-batches per step
    ck.load_model(run)

    # Resume for 3 more steps == an uninterrupted run stopped at the same step, bit for bit
    # (weights, optimizer, and the real loader's position).
    s = train(config_for_run(run, resume=True, stop_at=k + 3))
    assert (s["start_step"], s["step"], s["stopped"]) == (k, k + 3, "stop_at")
    straight = dataclasses.replace(config_for_run(run, resume=True), out_dir=str(tmp_path / "s"),
                                   resume=False, stop_at=k + 3)
    train(straight)
    _assert_same_weights(run, tmp_path / "s", exact=True)
    assert (ck.load_checkpoint(run).loader_states
            == ck.load_checkpoint(tmp_path / "s").loader_states)


def test_seq_warmup_trains_short_contexts_first_and_resumes_exactly_across_the_switch(prepared,
                                                                                   tmp_path):
    model = dict(n_layer=2, n_embd=64, n_head=2, sequence_len=128)
    base = dict(data_dir=str(prepared), model=model, steps=6, device_batch_size=2,
                total_batch_tokens=512, eval_every=0, seq_warmup_frac=0.5, seq_warmup_len=64)
    assert train(TrainConfig(out_dir=str(tmp_path / "straight"), **base))["seq_warmup_steps"] == 3
    states = ck.load_checkpoint(tmp_path / "straight").loader_states
    assert states[0]["phase"] == "full" and states[0]["served"] == 12  # 6 steps x 2 micro
    assert states[0]["state"]["seq_len"] == 128 and states[0]["state"]["batches"] == 6
    for stop in (2, 3):  # inside the short phase, and exactly at the switch
        run = tmp_path / f"stop{stop}"
        train(TrainConfig(out_dir=str(run), stop_at=stop, **base))
        short = ck.load_checkpoint(run).loader_states[0]
        assert short["phase"] == ("short" if stop < 3 else "full")
        if stop < 3:  # 4 rows of 64 tokens per micro-batch: the same 256 tokens as 2 x 128
            assert (short["state"]["seq_len"], short["state"]["batch_size"]) == (64, 4)
        train(TrainConfig(out_dir=str(run), resume=True, **base))
        _assert_same_weights(tmp_path / "straight", run, exact=True)
    with pytest.raises(InputError, match="divide"):
        train(TrainConfig(out_dir=str(tmp_path / "bad"), **{**base, "seq_warmup_len": 96}))
    # off where the model's context is not longer than the warmup's
    s = train(TrainConfig(out_dir=str(tmp_path / "off"), **{**base, "seq_warmup_len": 128}))
    assert s["seq_warmup_steps"] == 0


def test_readdressed_training_resumes_exactly_and_differs_from_plain(prepared, tmp_path):
    model = dict(n_layer=2, n_embd=64, n_head=2, sequence_len=128)
    base = dict(data_dir=str(prepared), model=model, steps=4, device_batch_size=2,
                eval_every=0, seq_warmup_frac=0.0, readdress_src=0.5, readdress_dst=0.5)
    train(TrainConfig(out_dir=str(tmp_path / "straight"), **base))
    train(TrainConfig(out_dir=str(tmp_path / "stop"), stop_at=2, **base))
    train(TrainConfig(out_dir=str(tmp_path / "stop"), resume=True, **base))
    _assert_same_weights(tmp_path / "straight", tmp_path / "stop", exact=True)
    cfg = json.loads((tmp_path / "straight" / "config.json").read_text())["train"]
    assert (cfg["readdress_src"], cfg["readdress_dst"]) == (0.5, 0.5)
    plain = {**base, "readdress_src": 0.0, "readdress_dst": 0.0}
    train(TrainConfig(out_dir=str(tmp_path / "plain"), **plain))
    with pytest.raises(AssertionError):
        _assert_same_weights(tmp_path / "straight", tmp_path / "plain", exact=True)


def test_result_loss_weight_counts_each_result_target_that_many_times():
    """training_loss: at weight 1 the model's own mean; at w, the mean with every RTT_START /
    FAILED / RTT byte target counted w times (float64); ignored targets count for nothing."""
    from ping_llm import tokens
    from ping_llm.train import training_loss

    ms = [tokens.Measurement("192.0.2.1", f"198.51.100.{i}", 3.0 * i - 3.0, 1_700_000_000 + i)
          for i in range(4)]  # the first failed
    toks = torch.tensor([tokens.encode_reference(ms)])
    x, y = toks[:, :-1], toks[:, 1:].clone()
    y[0, -2:] = -1
    torch.manual_seed(0)
    model = GPT(_cfg("unused", model={**MODEL, "sequence_len": 128}).gpt_config()).double()
    with torch.no_grad():
        _, mean = model(x, y)
        _, per = model(x, y, loss_reduction="none")
        assert torch.equal(training_loss(model, x, y, None), mean)
        res = tokens.result_targets(x, y) & (y >= 0)
        other = ~tokens.result_targets(x, y) & (y >= 0)
        assert int(res.sum()) == 3 * 3 + 1 - 2  # the last RTT's two bytes are ignored
        for w in (0.5, 4.0):
            want = (per[other].sum() + w * per[res].sum()) / (other.sum() + w * res.sum())
            torch.testing.assert_close(training_loss(model, x, y, None, w), want,
                                       rtol=1e-12, atol=0)
        assert abs(training_loss(model, x, y, None, 1e9) - per[res].mean()) < 1e-6


def test_a_result_loss_weight_trains_differently_and_is_recorded(prepared, tmp_path):
    model = dict(n_layer=2, n_embd=64, n_head=2, sequence_len=128)
    base = dict(data_dir=str(prepared), model=model, steps=2, device_batch_size=2,
                eval_every=0, seq_warmup_frac=0.0, knowledge=False)
    train(TrainConfig(out_dir=str(tmp_path / "plain"), **base))
    train(TrainConfig(out_dir=str(tmp_path / "w4"), result_loss_weight=4, **base))
    cfg = json.loads((tmp_path / "w4" / "config.json").read_text())["train"]
    assert cfg["result_loss_weight"] == 4
    with pytest.raises(AssertionError):
        _assert_same_weights(tmp_path / "plain", tmp_path / "w4", exact=True)


def test_runs_recorded_before_seq_warmup_existed_resume_without_it(tmp_path):
    run = tmp_path / "old"
    _run(run, stop_at=4, seq_warmup_frac=0.0)
    for p in (run / "config.json", run / "checkpoint" / "config.json"):
        if p.exists():  # what a run written before the field existed looks like
            cfg = json.loads(p.read_text())
            for key in ("seq_warmup_frac", "seq_warmup_len", "readdress_src", "readdress_dst"):
                cfg["train"].pop(key)
            p.write_text(json.dumps(cfg))
    cfg = config_for_run(run, resume=True)
    assert cfg.seq_warmup_frac == 0.0 and cfg.readdress_src == cfg.readdress_dst == 0.0
    s = train(cfg, loader=SyntheticLoader(B, T), eval_loader=SyntheticLoader(B, T, split="val"))
    assert (s["start_step"], s["completed"]) == (4, True)


# ------------------------------------------------------------------------------------------------
# learning


@pytest.mark.slow
def test_training_lowers_held_out_loss_well_below_the_unigram_baseline(tmp_path):
    steps, bs, seq = 120, 8, 128
    cfg = TrainConfig(out_dir=str(tmp_path), preset="tiny", model={"sequence_len": seq},
                      steps=steps, device_batch_size=bs, eval_every=60, eval_batches=4,
                      log_every=20, save_every=0)
    s = train(cfg, loader=SyntheticLoader(bs, seq), eval_loader=SyntheticLoader(bs, seq,
                                                                                 split="val"))
    # Unigram baseline: token frequencies of the training batches the run saw (add-one
    # smoothed), scored on the same held-out batches.
    counts = torch.ones(267, dtype=torch.float64)
    train_stream = SyntheticLoader(bs, seq)
    for _ in range(steps):
        _, y = next(train_stream)
        counts += torch.bincount(y[y != -1], minlength=267)
    logp = (counts / counts.sum()).log()
    val = SyntheticLoader(bs, seq, split="val")
    nll = n = 0.0
    for _ in range(4):
        _, y = next(val)
        nll -= logp[y[y != -1]].sum().item()
        n += (y != -1).sum().item()
    unigram = nll / n
    assert unigram > 5.0  # the chain visits most of the 267 tokens about evenly
    assert s["final_eval_loss"] < 0.5 * unigram, (s["final_eval_loss"], unigram)


# ------------------------------------------------------------------------------------------------
# stages: a run started from another, a finished run extended


def test_init_from_starts_a_new_run_from_the_parent_s_weights_and_records_its_lineage(tmp_path):
    parent, child, grandchild = tmp_path / "parent", tmp_path / "child", tmp_path / "grand"
    train(_cfg(parent, steps=4, eval_every=4, save_every=0), loader=SyntheticLoader(B, T),
          eval_loader=SyntheticLoader(B, T, split="val"))
    train(_cfg(child, steps=2, eval_every=2, save_every=0, init_from=str(parent)),
          loader=SyntheticLoader(B, T, seed=1), eval_loader=SyntheticLoader(B, T, split="val"))
    # before its first step the child is its parent: the same held-out loss
    assert _curve(child, "eval", "eval_loss")[0][1] == _curve(parent, "eval", "eval_loss")[-1][1]
    lineage = ck.read_config(child)["lineage"]
    assert [(e["run"], e["step"]) for e in lineage] == [(str(parent.resolve()), 4)]
    train(_cfg(grandchild, steps=1, eval_every=0, save_every=0, init_from=str(child)),
          loader=SyntheticLoader(B, T))
    assert [e["step"] for e in ck.read_config(grandchild)["lineage"]] == [2, 4]  # nearest first
    with pytest.raises(InputError, match="its model is"):
        train(_cfg(tmp_path / "other", steps=1, init_from=str(parent),
                   model={**MODEL, "n_layer": 3}), loader=SyntheticLoader(B, T))
    # a parent recorded before the model had its newer fields (defaults then) is the same shape
    cfg_file = parent / "checkpoint" / "config.json"
    old = json.loads(cfg_file.read_text())
    for key in ("prefix_buckets", "knowledge_dim", "knowledge_vocab"):
        old["model"].pop(key)
    cfg_file.write_text(json.dumps(old))
    train(_cfg(tmp_path / "of_old", steps=1, eval_every=0, save_every=0, init_from=str(parent)),
          loader=SyntheticLoader(B, T))


def test_init_optimizer_takes_the_parent_s_moments_but_this_run_s_learning_rates(tmp_path):
    parent = tmp_path / "parent"
    train(_cfg(parent, steps=3, eval_every=0, save_every=0), loader=SyntheticLoader(B, T))
    runs = {}
    for moments in (False, True):
        run = tmp_path / f"child_{moments}"
        train(_cfg(run, steps=1, eval_every=0, save_every=0, init_from=str(parent),
                   init_optimizer=moments, matrix_lr=0.01), loader=SyntheticLoader(B, T, seed=1))
        runs[moments] = ck.load_checkpoint(run)
        assert _curve(run, key="lr_matrix")[0][1] == pytest.approx(0.01)
    adam = [k for k in runs[True].optimizer_tensors if k.endswith("exp_avg_sq")]
    p = ck.load_checkpoint(parent).optimizer_tensors
    for k in adam:  # one more step on top of the parent's moments, not moments from zero
        assert not torch.equal(runs[True].optimizer_tensors[k], runs[False].optimizer_tensors[k])
        assert runs[True].optimizer_tensors[k].sum() > p[k].sum() * 0.5


def test_a_finished_run_resumed_with_more_steps_is_extended_on_a_replanned_schedule(prepared,
                                                                                   tmp_path):
    model = dict(n_layer=2, n_embd=64, n_head=2, sequence_len=128)
    base = dict(data_dir=str(prepared), model=model, device_batch_size=2, total_batch_tokens=512,
                eval_every=0, seq_warmup_frac=0.5, seq_warmup_len=64, warmdown_frac=0.5,
                log_every=1)
    run = tmp_path / "run"
    assert train(TrainConfig(out_dir=str(run), steps=6, **base))["seq_warmup_steps"] == 3
    s = train(TrainConfig(out_dir=str(run), steps=10, resume=True, **base))
    assert s["completed"] and s["step"] == 10 and s["start_step"] == 6
    assert s["seq_warmup_steps"] == 3  # the warmup keeps its plan (its switch is behind it)
    lr = dict(_curve(run, key="lr_mult"))
    assert sorted(lr) == list(range(1, 11))
    # steps 7..10 follow the plan for 10 steps: flat to step 5, down over the last 5
    from ping_llm.optim import lr_multiplier

    for step in range(7, 11):
        assert lr[step] == pytest.approx(lr_multiplier(step - 1, 10, 0, 0.5))
    assert lr[6] == pytest.approx(lr_multiplier(5, 6, 0, 0.5))  # the first plan, as it was
    again = train(TrainConfig(out_dir=str(run), steps=10, resume=True, **base))
    assert again["step"] == 10 and again["start_step"] == 10  # done is done


def test_a_mixture_of_datasets_trains_resumes_exactly_and_records_its_datasets(prepared,
                                                                              tmp_path):
    model = dict(n_layer=2, n_embd=64, n_head=2, sequence_len=128)
    base = dict(data_dir=str(prepared), extra_data=[str(prepared)], mix=[0.7, 0.3], model=model,
                steps=6, device_batch_size=2, total_batch_tokens=512, eval_every=3,
                eval_batches=2, seq_warmup_frac=0.5, seq_warmup_len=64)
    train(TrainConfig(out_dir=str(tmp_path / "straight"), **base))
    run = tmp_path / "stopped"
    train(TrainConfig(out_dir=str(run), stop_at=2, **base))
    train(TrainConfig(out_dir=str(run), resume=True, **base))
    _assert_same_weights(tmp_path / "straight", run, exact=True)
    state = ck.load_checkpoint(run).loader_states[0]["state"]
    assert state["format"] == "ping-llm-mixture/1" and len(state["states"]) == 2
    mix = ck.read_config(run)["mixture"]
    assert [(m["data_dir"], m["weight"]) for m in mix] == [(str(prepared), 0.3)]
    with pytest.raises(InputError, match="extra_data"):  # another mixture is another run
        train(TrainConfig(out_dir=str(run), resume=True, **{**base, "extra_data": [], "steps": 8}))
    with pytest.raises(InputError, match="2 weights for 1 datasets"):
        train(TrainConfig(out_dir=str(tmp_path / "bad"), **{**base, "extra_data": []}))
