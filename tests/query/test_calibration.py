"""calibration + calibrate: a monotone map of the RTT CDF per context size and Platt scaling of
P(failed), fitted on val, stored in the run directory, applied by every distribution the engine
returns (and off on request); `ping-llm calibrate` fits it for a trained run."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from ping_llm import checkpoint
from ping_llm.cli import main
from ping_llm.data import schema
from ping_llm.errors import InputError
from ping_llm.eval.calibrate import calibrate
from ping_llm.query.calibration import CALIBRATION_FILE, Calibration, pair_keys
from ping_llm.query.engine import Engine

GRID = np.linspace(-6, 6, 1201)  # a fine grid standing in for the RTT codes (float64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _normal_pmf(mu: np.ndarray, sigma: float) -> np.ndarray:
    """(N, G) pmf of N(mu, sigma) discretised on GRID (mass of each cell's interval)."""
    edges = np.r_[-np.inf, (GRID[1:] + GRID[:-1]) / 2, np.inf]
    cdf = stats.norm.cdf((edges[None, :] - mu[:, None]) / sigma)
    return np.diff(cdf, axis=1)


def _pit(pmf: np.ndarray, y: np.ndarray, rng) -> np.ndarray:
    """Randomised PIT of y (snapped to GRID) under each row's pmf."""
    j = np.clip(np.searchsorted(GRID, y), 0, len(GRID) - 1)
    F = np.cumsum(pmf, axis=1)
    below = F[np.arange(len(y)), j] - pmf[np.arange(len(y)), j]
    return below + rng.random(len(y)) * pmf[np.arange(len(y)), j]


def _coverage(pmf: np.ndarray, y: np.ndarray, level: float) -> float:
    F = np.cumsum(pmf, axis=1)
    lo = GRID[np.argmax((1 - level) / 2 <= F, axis=1)]
    hi = GRID[np.argmax((1 + level) / 2 <= F, axis=1)]
    return float(np.mean((lo <= y) & (y <= hi)))


def test_the_identity_map_changes_nothing():
    cal = Calibration.identity()
    p = _normal_pmf(np.array([0.0, 1.0]), 0.7)
    np.testing.assert_allclose(cal.probs(p), p / p.sum(1, keepdims=True), atol=1e-15)
    assert cal.p_failed(0.25) == pytest.approx(0.25, abs=1e-12)


def test_an_over_confident_forecaster_gets_nominal_coverage_on_fresh_outcomes():
    rng = np.random.default_rng(0)
    n = 4000
    mu = rng.normal(0, 1, 2 * n)
    y = mu + rng.normal(0, 1.0, 2 * n)  # the truth is twice as wide as the forecast
    pmf = _normal_pmf(mu, 0.5)
    fit, test = slice(0, n), slice(n, 2 * n)
    assert _coverage(pmf[test], y[test], 0.9) < 0.7  # over-confident before
    cal = Calibration.fit(_pit(pmf[fit], y[fit], rng), np.zeros(n, int), np.full(n, 0.1),
                          rng.random(n) < 0.1, np.full(n, "known"))
    out = cal.probs(pmf[test])
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-12)
    assert (out >= 0).all()
    for level in (0.5, 0.9):  # 3 sigma of binomial noise on 4,000 outcomes, plus the knots
        assert _coverage(out, y[test], level) == pytest.approx(level, abs=0.03)
    # the median (the point prediction) of a symmetric forecast does not move
    F = np.cumsum(out, axis=1)
    med = GRID[np.argmax(F >= 0.5, axis=1)]
    assert np.median(np.abs(med - mu[test])) < 0.1


def test_each_population_and_context_size_band_gets_its_own_map():
    rng = np.random.default_rng(1)
    n = 6000
    mu = rng.normal(0, 1, n)
    pmf = _normal_pmf(mu, 0.5)
    n_ctx = np.where(np.arange(n) % 2 == 0, 0, 20)
    pop = np.array(["known", "new_pair", "new"]).repeat(n // 3)
    # known pairs calibrated without context and over-confident with it; a known source's new
    # destinations 2x too sharp; new sources 3x
    wide = np.where(pop == "known", np.where(n_ctx == 0, 0.5, 1.5),
                    np.where(pop == "new_pair", 1.0, 1.5))
    y = mu + rng.normal(0, 1, n) * wide + np.where(pop == "new_pair", 0.5, 0.0)  # + a bias
    cal = Calibration.fit(_pit(pmf, y, rng), n_ctx, np.full(n, 0.1), rng.random(n) < 0.1,
                          pop, known_sources=["10.0.0.1", "10.0.0.2"],
                          known_pairs=pair_keys(["10.0.0.1"], ["10.9.9.9"]))
    assert [m["min_context"] for m in cal.maps["known"]] == [0, 1, 4, 16]
    assert cal.fitted["replies_per_band"] == {
        f"{p} {b}+": (n // 6 if b in (0, 16) else 0)
        for p in ("known", "new_pair", "new") for b in (0, 1, 4, 16)}
    u = np.linspace(0.05, 0.95, 19)
    assert np.abs(cal.cdf(u, 0, "known") - u).max() < 0.05  # close to the identity
    assert cal.cdf(np.array([0.05]), 20, "known")[0] > 0.2  # the tails get much more mass
    at_k0 = [cal.cdf(np.array([0.05]), 0, p)[0] for p in ("known", "new_pair", "new")]
    assert at_k0[0] < 0.1 < at_k0[1] < at_k0[2]  # wider the less the model knows, even at k = 0
    # new pairs' maps are symmetric: their spread is corrected, their median kept (their bias
    # belongs to val's pairs, not to the next ones)
    for k in (0, 20):
        assert cal.cdf(np.array([0.5]), k, "new_pair")[0] == pytest.approx(0.5, abs=1e-12)
        lo, hi = cal.cdf(np.array([0.1, 0.9]), k, "new_pair")
        assert lo == pytest.approx(1 - hi, abs=1e-12)
    # bands without val data fall back to the map of the population's replies
    assert cal.map_for(2, "new")["u"] == cal.map_for(5, "new")["u"] != cal.map_for(0, "new")["u"]
    assert cal.population("10.0.0.1", "10.9.9.9") == "known"
    assert cal.population("10.0.0.1", "10.9.9.8") == cal.population("10.0.0.2", "10.9.9.9") \
        == cal.population("10.0.0.1", None) == "new_pair"  # None: a destination prefix
    assert cal.population("10.0.0.3", "10.9.9.9") == cal.population(None, "10.9.9.9") == "new"


def test_pair_keys_are_the_same_in_every_process():
    import subprocess
    import sys
    code = "from ping_llm.query.calibration import pair_keys; print(pair_keys(['a'], ['b'])[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123"}).stdout
    assert int(out) == int(pair_keys(["a"], ["b"])[0]) != int(pair_keys(["b"], ["a"])[0])


def test_a_calibration_from_before_pairs_were_told_apart_still_loads(tmp_path):
    same = [{"min_context": 0, "u": [0.0, 0.5, 1.0], "r": [0.0, 0.3, 1.0]}]
    wide = [{"min_context": 0, "u": [0.0, 0.5, 1.0], "r": [0.0, 0.45, 1.0]}]
    old = {"format": "ping-llm-calibration/1", "maps": {"known": same, "new": wide},
           "platt": {"known": [1.0, 0.5], "new": [2.0, 0.0]}, "known_sources": ["10.0.0.1"],
           "fitted": {"step": 3}}
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(old))
    cal = Calibration.load(tmp_path)
    assert cal.population("10.0.0.1", "10.9.9.9") == "known"  # no pairs: as it was
    assert cal.maps["new_pair"] == same and cal.platt["new_pair"] == [1.0, 0.5]


def test_platt_scaling_corrects_a_failure_rate_and_keeps_the_ranking():
    rng = np.random.default_rng(2)
    p = rng.uniform(0.01, 0.2, 20000)
    y = rng.random(len(p)) < np.minimum(1.0, 2.5 * p)  # failures 2.5x more likely than said
    cal = Calibration.fit(np.full(len(p), 0.5), np.zeros(len(p), int), p, y,
                          np.full(len(p), "known"))
    q = cal.p_failed(p, "known")
    assert np.mean(q) == pytest.approx(np.mean(y), abs=0.01)
    assert (np.diff(q[np.argsort(p)]) >= 0).all()


def test_save_load_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(3)
    cal = Calibration.fit(rng.random(500), rng.integers(0, 30, 500), rng.random(500) * 0.2,
                          rng.random(500) < 0.1, rng.choice(["known", "new"], 500),
                          ["192.0.2.1"], pair_keys(["192.0.2.1"], ["192.0.2.9"]),
                          fitted={"step": 7})
    cal.save(tmp_path)
    back = Calibration.load(tmp_path)
    assert back == cal and back.fitted["step"] == 7
    assert Calibration.load(tmp_path / "nowhere") is None
    (tmp_path / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        Calibration.load(tmp_path)
    bad = [{"min_context": 0, "u": [0.0, 0.7, 0.5, 1.0], "r": [0.0, 0.2, 0.6, 1.0]}]
    d = {"format": "ping-llm-calibration/1", "maps": {"known": bad, "new": bad},
         "platt": {"known": [1, 0], "new": [1, 0]}}
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(d))
    with pytest.raises(InputError, match="knots"):
        Calibration.load(tmp_path)
    with pytest.raises(InputError, match="too few"):
        Calibration.fit(rng.random(10), np.zeros(10, int), np.full(10, 0.1), np.zeros(10, bool),
                        np.full(10, "known"))
    with pytest.raises(InputError, match="populations must be among"):
        Calibration.fit(rng.random(60), np.zeros(60, int), np.full(60, 0.1), np.zeros(60, bool),
                        np.full(60, "old"))


# ----------------------------------------------------------------------------------------------
# in the engine and on a trained run


@pytest.fixture(scope="module")
def calibrated_run(trained_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(trained_run.run_dir, run)
    summary = calibrate(trained_run.data_dir, run, max_queries=60, progress=False)
    return run, summary


def test_calibrate_fits_on_val_and_writes_the_run_calibration(calibrated_run, trained_run):
    run, s = calibrated_run
    cal = Calibration.load(run)
    step = checkpoint.read_meta(checkpoint.find_checkpoint(run))["step"]
    assert s["file"] == str(run / CALIBRATION_FILE) and s["step"] == step
    assert cal.fitted["step"] == step and cal.fitted["split"] == "val"
    # 5 context sizes x (60 val queries about known sources, the same re-addressed as new
    # ones, and 60 val_probe queries about new probes under their real addresses)
    vp = schema.read_canonical(trained_run.data_dir / "splits" / "val_probe.parquet")
    assert vp.num_rows >= 60 and s["val_probe_queries"] == 60
    assert cal.fitted["queries"] == s["queries"] == 60 and cal.fitted["outcomes"] == 900
    assert cal.fitted["val_probe"]["queries"] == 60
    assert s["populations"] == cal.fitted["populations"] == ["known sources", "new sources",
                                                             "new probes"]
    train = schema.read_canonical(trained_run.data_dir / "splits" / "train.parquet")
    assert cal.known_sources == sorted(set(train["src_addr"].to_pylist()))
    pairs = set(zip(train["src_addr"].to_pylist(), train["dst_addr"].to_pylist(), strict=True))
    assert s["known_pairs"] == len(pairs)
    assert all(cal.population(a, b) == "known" for a, b in list(pairs)[:50])
    assert set(cal.maps) == {"known", "new_pair", "new"}
    for rows in s["val"].values():
        assert set(rows) == {"k=0", "k=1", "k=4", "k=16", "k=64"}
        for v in rows.values():
            assert 0 <= v["after"]["coverage_90"] <= 1
    assert not (trained_run.run_dir / CALIBRATION_FILE).exists()  # the copy, not the original


def test_a_dataset_without_val_probe_is_calibrated_on_val_alone(trained_run, tmp_path):
    """Datasets prepared before val_probe existed (or with --val-probe-fraction 0) still
    calibrate: new sources then come from val re-addressed only."""
    data = tmp_path / "dataset"
    shutil.copytree(trained_run.data_dir, data)
    card = json.loads((data / "card.json").read_text())
    del card["splits"]["val_probe"]
    (data / "card.json").write_text(json.dumps(card))
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run)
    s = calibrate(data, run, max_queries=20, contexts=(0, 1), progress=False)
    assert s["populations"] == ["known sources", "new sources"] and s["val_probe_queries"] == 0
    assert Calibration.load(run).fitted["outcomes"] == 20 * 2 * 2


def _busiest_source(train) -> tuple[str, list[str], list[dict]]:
    """The train split's busiest source, three of its destinations, its first five
    measurements."""
    t = schema.read_canonical(train).sort_by("event_time").to_pylist()
    counts = Counter(r["src_addr"] for r in t)
    src = counts.most_common(1)[0][0]
    mine = [r for r in t if r["src_addr"] == src]
    dsts = list(dict.fromkeys(r["dst_addr"] for r in mine))[:3]
    ctx = [{"src": src, "dst": r["dst_addr"], "rtt_ms": r["rtt"],
            "time": r["event_time"].isoformat()} for r in mine[:5]]
    return src, dsts, ctx


def test_every_distribution_of_a_calibrated_run_is_the_raw_one_mapped(calibrated_run,
                                                                      trained_run):
    run, _ = calibrated_run
    cal = Calibration.load(run)
    eng, raw = Engine.load(run), Engine.load(run, calibrated=False)
    assert eng.calibration == cal and raw.calibration is None
    src, dsts, ctx = _busiest_source(trained_run.data_dir / "splits" / "train.parquet")
    stranger = "203.0.113.77"  # never a train source: the "new" maps
    nowhere = "198.51.100.9"  # never a destination: a known source's new pair
    assert cal.population(stranger, dsts[0]) == "new"
    assert cal.population(src, nowhere) == "new_pair"
    assert cal.maps["known"] != cal.maps["new"]
    for who, dst in ((src, dsts[0]), (src, nowhere), (stranger, dsts[0])):
        pop = cal.population(who, dst)
        for context in (None, ctx):
            a, b = eng.rtt(who, dst, context=context), raw.rtt(who, dst, context=context)
            n = len(context or [])
            assert a.calibrated and not b.calibrated
            np.testing.assert_array_equal(a.codes, b.codes)
            np.testing.assert_allclose(a.probs, cal.probs(b.probs, n, pop), rtol=1e-12,
                                       atol=1e-15)
            assert a.p_failed == pytest.approx(cal.p_failed(b.p_failed, pop), rel=1e-12)
            assert a.to_dict()["calibrated"] is True
    prefix = src.rsplit(".", 1)[0] + ".0/30" if "." in src else src + "/126"
    a, b = eng.rtt(prefix, dsts[1]), raw.rtt(prefix, dsts[1])  # a prefix is a new source
    np.testing.assert_allclose(a.probs, cal.probs(b.probs, 0, "new"), rtol=1e-12, atol=1e-15)
    ranked = eng.rank(src, dsts)
    medians = {d: eng.rtt(src, d).median for d in dsts}
    assert [r.median_ms for r in ranked] == sorted(medians.values())


def test_a_stale_calibration_is_refused_and_can_be_turned_off(calibrated_run, tmp_path, capsys):
    run, _ = calibrated_run
    stale = tmp_path / "run"
    shutil.copytree(run, stale)
    cal = Calibration.load(stale)
    cal.fitted["step"] = -1
    cal.save(stale)
    with pytest.raises(InputError, match="fitted at step -1"):
        Engine.load(stale)
    assert Engine.load(stale, calibrated=False).calibration is None
    args = ["query", "rtt", "--run", str(stale), "10.0.0.1", "10.0.0.2", "--json"]
    assert main(args) == 2 and "ping-llm calibrate" in capsys.readouterr().err
    assert main([*args, "--no-calibration"]) == 0
    assert json.loads(capsys.readouterr().out)["calibrated"] is False


def test_cli_calibrate_prints_val_coverage_before_and_after(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run)
    argv = ["calibrate", "--data", str(trained_run.data_dir), "--run", str(run),
            "--max-queries", "40", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for who in ("val, known sources", "val, new sources", "val_probe, new probes"):
        assert any(who in ln and "k=16" in ln and "->" in ln for ln in lines), who
    assert (run / CALIBRATION_FILE).is_file()
    assert main([*argv, "--json", "--known-only"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["queries"] == 40 and out["populations"] == ["known sources"]
    assert main(["calibrate", "--data", str(tmp_path), "--run", str(run)]) == 2
    assert "error" in capsys.readouterr().err


def test_eval_scores_the_calibrated_model_and_says_so(calibrated_run, trained_run, tmp_path):
    from ping_llm.eval.evaluate import evaluate

    run, _ = calibrated_run
    kw = dict(splits=("val",), max_queries=8, contexts=(0,), n_examples=0, progress=False)
    res = evaluate(trained_run.data_dir, run, tmp_path / "cal", **kw)
    assert res.run.calibration == Calibration.load(run).fitted
    text = (tmp_path / "cal" / "summary.md").read_text()
    assert re.search(r"calibrated on val \(60 queries, val_probe \d+ queries x k=", text)
    raw = evaluate(trained_run.data_dir, run, tmp_path / "raw", calibrated=False, **kw)
    assert raw.run.calibration is None
    assert "raw" in (tmp_path / "raw" / "summary.md").read_text()
    a = res.splits["val"].methods["model k=0"]
    b = raw.splits["val"].methods["model k=0"]
    assert a["nll"] == b["nll"]  # token NLL is the raw model's either way
    assert a["crps_ms"] != b["crps_ms"]
