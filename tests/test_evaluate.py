"""The evaluation harness: its aggregation on hand-made cases, the model scorer against the query
engine, context selection, baselines both ways, the leak refusal, and an end-to-end evaluation
of the session's tiny trained model (`trained_run`, conftest.py) on the synthetic Internet, KL to
the generator's truth included, with its report.

The metric functions themselves are tested in test_metrics.py; here we test how the harness uses
them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ping_llm import evaluate as ev
from ping_llm import tokens as tk
from ping_llm.cli import main as cli_main
from ping_llm.errors import InputError

MODEL = dict(n_layer=2, n_embd=64, n_head=2, sequence_len=256)
FAST = dict(max_queries=16, contexts=(0, 2), n_examples=1, progress=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _record_fingerprint(run_dir: Path, fingerprint: str | None) -> None:
    """Set (or remove, with None) the train fingerprint a run directory records."""
    for p in (run_dir / "config.json", run_dir / "checkpoint" / "config.json"):
        if not p.exists():
            continue
        cfg = json.loads(p.read_text())
        if fingerprint is None:
            cfg.pop("dataset", None)
        else:
            cfg["dataset"] = {"train_fingerprint": fingerprint}
        p.write_text(json.dumps(cfg))


def _prepare(inputs, out: Path, seed: int = 0) -> Path:
    from ping_llm.prepare import PrepareConfig, prepare

    prepare(inputs, out, PrepareConfig(seed=seed), progress=False)
    return out


@pytest.fixture(scope="module")
def results(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    res = ev.evaluate(trained_run.data_dir, trained_run.run_dir, out, **FAST)
    res["_out"] = out
    return res


# ----------------------------------------------------------------------------------------------
# aggregation on hand-made cases


def test_summarize_scores_rtt_on_replies_and_failure_on_all_rows():
    obs = np.array([10.0, 20.0, np.nan, 40.0])
    failed = np.array([False, False, True, False])
    rows = dict(median=np.array([12.0, 20.0, 99.0, 30.0]),
                crps=np.array([1.0, 2.0, 1000.0, 3.0]),  # the failed row's value must not count
                in50=np.array([1.0, 0.0, np.nan, 1.0]),
                p_failed=np.array([0.1, 0.2, 0.9, 0.3]),
                logp=np.array([-1.0, -2.0, -3.0, -6.0]))
    s = ev.summarize(obs, failed, rows)
    assert (s["n"], s["n_success"], s["n_failed"]) == (4, 3, 1)
    # absolute errors 2, 0, 10; relative 0.2, 0, 0.25
    assert s["mae_ms"] == pytest.approx(4.0)
    assert s["median_ae_ms"] == pytest.approx(2.0)
    assert s["rel_p50"] == pytest.approx(0.2)
    assert s["rel_p90"] == pytest.approx(0.2 + 0.8 * 0.05)  # linear interpolation
    assert s["crps_ms"] == pytest.approx(2.0)
    assert s["coverage_50"] == pytest.approx(2 / 3)
    assert s["roc_auc"] == pytest.approx(1.0)  # the failed row has the highest P(failed)
    assert s["pr_auc"] == pytest.approx(1.0)
    assert s["brier"] == pytest.approx((0.01 + 0.04 + 0.01 + 0.09) / 4)
    assert s["logp_result"] == pytest.approx(-3.0)
    # a selection, and rows without an answer (NaN median: e.g. no truth) are left out
    rows["median"][0] = np.nan
    s2 = ev.summarize(obs, failed, rows, np.array([True, True, True, False]))
    assert (s2["n"], s2["n_success"]) == (2, 1)
    assert s2["mae_ms"] == pytest.approx(0.0)


def test_distribution_metrics_on_a_four_point_grid():
    grid = np.array([10.0, 20.0, 30.0, 40.0])  # exact RTT codes, so snapping keeps them
    pmf = np.array([[0.1, 0.4, 0.4, 0.1], [0.1, 0.4, 0.4, 0.1]])
    obs = np.array([20.0, np.nan])
    m = ev.distribution_metrics(grid, pmf, obs, np.random.default_rng(0))
    np.testing.assert_allclose(m["q"][0], [10, 20, 20, 30, 40])  # levels .05 .25 .5 .75 .95
    # E|X - 20| = 7, E|X - X'| / 2 = 4.3 by hand
    assert m["crps"][0] == pytest.approx(2.7)
    assert m["crps_cens"][0] == pytest.approx(2.7)
    assert 0.1 <= m["pit"][0] <= 0.5  # P(X < 20) = 0.1, P(X <= 20) = 0.5
    assert m["in50"][0] == 1 and m["in90"][0] == 1
    assert np.isnan(m["crps"][1]) and np.isnan(m["pit"][1])
    assert m["p_tail"][0] == 0


def test_censored_crps_caps_far_tail_mass_at_10_s():
    grid = np.array([10.0, 1e6])
    pmf = np.array([[0.5, 0.5]])
    m = ev.distribution_metrics(grid, pmf, np.array([10.0]), np.random.default_rng(0))
    # CRPS = E|X - y| - E|X - X'| / 2 = 0.5 d - 0.25 d with d the distance of the two atoms
    assert m["crps"][0] == pytest.approx(0.25 * (1e6 - 10))
    assert m["crps_cens"][0] == pytest.approx(0.25 * (ev.CENSOR_MS - 10))
    assert m["p_tail"][0] == pytest.approx(0.5)


def test_spread_coarse_spreads_only_unrefined_bins():
    pmf = np.zeros((1, len(ev.CANON)))
    pmf[0, 5 * 256 + 0x80] = 0.25  # a coarse bin: all its mass on the centre code
    pmf[0, 7 * 256:8 * 256] = 0.75 / 256  # a refined bin
    out = ev.spread_coarse(pmf)
    np.testing.assert_allclose(out[0, 5 * 256:6 * 256], 0.25 / 256)
    np.testing.assert_allclose(out[0, 7 * 256:8 * 256], 0.75 / 256)
    assert out.sum() == pytest.approx(1.0)


def test_breakdowns_split_rows_by_label():
    obs = np.array([10.0, 20.0, 30.0, 40.0])
    failed = np.zeros(4, bool)
    methods = {"m": {"median": np.array([11.0, 22.0, 33.0, 44.0])}}
    groups = {"ip_version": np.array(["IPv4", "IPv6", "IPv4", "IPv6"], dtype=object)}
    b = ev.breakdowns(groups, obs, failed, methods)["ip_version"]
    assert b["IPv4"]["m"]["mae_ms"] == pytest.approx(2.0)  # errors 1, 3
    assert b["IPv6"]["m"]["mae_ms"] == pytest.approx(3.0)  # errors 2, 4


def test_seen_bins_label_counts():
    labels = ev._bins(np.array([0, 1, 9, 10, 99, 100, 5000]), ev.PAIR_SEEN)
    assert labels.tolist() == ["0", "1-9", "1-9", "10-99", "10-99", "100+", "100+"]


def test_subsample_is_seeded_per_set_and_sorted():
    a = ev.subsample(10_000, 100, 0, "test_time")
    assert len(a) == 100 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, ev.subsample(10_000, 100, 0, "test_time"))
    assert not np.array_equal(a, ev.subsample(10_000, 100, 1, "test_time"))
    assert not np.array_equal(a, ev.subsample(10_000, 100, 0, "test_pair"))
    assert np.array_equal(ev.subsample(50, 100, 0, "x"), np.arange(50))
    assert np.array_equal(ev.subsample(50, None, 0, "x"), np.arange(50))


def _table(rows):
    src, dst, rtt, t = zip(*rows, strict=True)
    return pa.table({"event_time": pa.array(t, pa.int64()).cast(pa.timestamp("s", tz="UTC")),
                     "src_addr": list(src), "dst_addr": list(dst),
                     "ip_version": pa.array([4] * len(rows), pa.int8()),
                     "rtt": pa.array(rtt, pa.float64())})


def test_context_is_the_most_recent_measurements_strictly_before_the_query():
    pool = ev.ContextPool(_table([
        ("1.0.0.1", "2.0.0.1", 10.0, 100), ("1.0.0.1", "2.0.0.2", 11.0, 50),
        ("1.0.0.1", "2.0.0.3", -1.0, 300), ("1.0.0.2", "2.0.0.1", 9.0, 1),
        ("1.0.0.1", "2.0.0.4", 12.0, 200)]))
    lo, p = pool.before(np.array(["1.0.0.1", "1.0.0.1", "9.9.9.9"], dtype=object),
                        np.array([250, 100, 1000]))
    ctx = pool.context(lo[0], p[0], 2, 10_000)
    assert [(m.dst, m.time) for m in ctx] == [("2.0.0.1", 100), ("2.0.0.4", 200)]
    assert [m.time for m in pool.context(lo[0], p[0], 16, 10_000)] == [50, 100, 200]
    assert [m.time for m in pool.context(lo[1], p[1], 4, 10_000)] == [50]  # t = 100 excluded
    assert pool.context(lo[2], p[2], 4, 10_000) == []  # unknown source: cold start
    # a token budget keeps the most recent measurements that fit
    one = len(tk.encode_reference(pool.context(lo[0], p[0], 1, 10_000)))
    assert len(pool.context(lo[0], p[0], 3, one + 5)) == 1


def test_baselines_are_reported_covered_only_and_with_fallback():
    from ping_llm.baselines import GlobalMedian, Observations, PairHistory

    train = Observations(["a", "a", "a", "c"], ["b", "b", "b", "d"], [10.0, 12.0, 14.0, 100.0])
    fitted = {"global_median": GlobalMedian().fit(train), "pair_median": PairHistory().fit(train)}
    src, dst = np.array(["a", "e"]), np.array(["b", "f"])
    obs, failed = np.array([11.0, 50.0]), np.zeros(2, bool)
    rows = ev.baseline_predictions(fitted, src, dst, obs, failed)
    s = ev.baseline_summary(rows["pair_median"], obs, failed)
    assert s["coverage"] == 0.5
    assert s["covered"]["n"] == 1 and s["covered"]["mae_ms"] == pytest.approx(1.0)  # 12 vs 11
    # the uncovered pair falls back to the global median of 10, 12, 14, 100 = 13
    assert s["fallback"]["mae_ms"] == pytest.approx((1.0 + 37.0) / 2)
    assert rows["pair_median"]["crps"][0] == pytest.approx(
        ev.M.crps_quantiles(ev.BASELINE_LADDER,
                            fitted["pair_median"].predict_quantiles(["a"], ["b"],
                                                                    ev.BASELINE_LADDER), [11.0])[0])


def test_kl_of_the_truth_against_itself_is_zero():
    pmf = np.zeros((2, len(ev.CANON)))
    pmf[0, 300:556] = 1 / 256
    pmf[1, 1000:1512] = 1 / 512
    pf = np.array([0.1, 0.0])
    for v in ev._kl(pf, pmf, pf, pmf).values():
        np.testing.assert_allclose(v, 0.0, atol=1e-6)  # the 1e-12 floor, renormalised
    shifted = np.roll(pmf, 256, axis=1)
    assert np.all(ev._kl(pf, pmf, pf, shifted)["kl_rtt"] > 1.0)


# ----------------------------------------------------------------------------------------------
# the model scorer against the query engine


def _random_model():
    from ping_llm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # far from the (near-uniform) init, so the test has teeth
    return model.eval()


def test_teacher_forced_scores_match_the_query_engine():
    from ping_llm.query import Engine

    model = _random_model()
    engine = Engine(model, byte2_mass=1.0)  # every byte1 bin refined: exact code probabilities
    ctx = [tk.Measurement("192.0.2.1", "198.51.100.7", 23.5, 1_700_000_000),
           tk.Measurement("192.0.2.1", "198.51.100.9", -1.0, 1_700_000_100)]
    queries = [tk.Measurement("192.0.2.1", "203.0.113.5", 41.25, 1_700_000_160),
               tk.Measurement("192.0.2.1", "203.0.113.5", -1.0, 1_700_000_999),
               tk.Measurement("2001:db8::1", "2001:db8:5::3", 180.0, None)]
    for context in (ctx, []):
        for m in queries:
            if context and ":" in m.src:
                continue
            seq = tk.encode_reference(context + [m])
            mine = ev.score_queries(model, [seq], [len(tk.encode_reference(context))], "cpu")[0]
            ref = engine.score(m, context=context)
            assert set(mine["fields"]) == set(ref.fields)
            for f, v in ref.fields.items():
                assert mine["fields"][f] == pytest.approx(v, abs=1e-5)
            assert mine["result"] == pytest.approx(ref.result_conditional, abs=1e-5)
            if context:
                assert mine["tokens"]["start"] == pytest.approx(ref.start, abs=1e-5)
            # and the result's log P is that of the engine's exact distribution
            d = engine.rtt(m.src, m.dst, m.time, context=context)
            if m.rtt_ms < 0:
                p = d.p_failed
            else:
                code = int(tk.rtt_to_code(m.rtt_ms))
                p = (1 - d.p_failed) * d.probs[np.searchsorted(d.codes, code)]
            assert mine["result"] == pytest.approx(math.log(p), abs=1e-4)


def test_batched_scoring_with_right_padding_equals_one_by_one():
    model = _random_model()
    ms = [tk.Measurement("192.0.2.1", "203.0.113.5", 41.25, 1_700_000_160),
          tk.Measurement("2001:db8::1", "2001:db8:5::3", -1.0, None),
          tk.Measurement("192.0.2.1", "203.0.113.9", 7.0, None)]
    ctx = [tk.Measurement("192.0.2.1", "198.51.100.7", 23.5, 1_700_000_000)]
    seqs = [tk.encode_reference([m]) for m in ms] + [tk.encode_reference(ctx + [ms[2]])]
    starts = [0, 0, 0, len(tk.encode_reference(ctx))]
    assert len({len(x) for x in seqs}) == 4  # every length differs: one padded batch
    together = ev.score_queries(model, seqs, starts, "cpu")
    for seq, st, got in zip(seqs, starts, together, strict=True):
        alone = ev.score_queries(model, [seq], [st], "cpu")[0]
        assert got["tokens"].keys() == alone["tokens"].keys()
        for key, v in alone["tokens"].items():
            assert got["tokens"][key] == pytest.approx(v, abs=1e-5)
        assert got["result"] == pytest.approx(alone["result"], abs=1e-5)


def test_field_blocks_follow_the_role_tokens():
    m = tk.Measurement("192.0.2.1", "203.0.113.5", 41.25, 1_700_000_160)
    toks = tk.encode_reference([m])
    blocks = ev.field_blocks(toks, 0)
    assert [b[0] for b in blocks] == ["src", "dst", "time", "result"]
    assert [b[2] - b[1] for b in blocks] == [5, 5, 9, 3]
    assert blocks[-1][2] == len(toks)


# ----------------------------------------------------------------------------------------------
# the leak check


def _copy_run(trained_run, tmp_path, fingerprint) -> Path:
    run = tmp_path / "run-copy"
    shutil.copytree(trained_run.run_dir, run)
    _record_fingerprint(run, fingerprint)
    return run


def test_eval_refuses_a_run_trained_on_a_differently_split_dataset(trained_run, tmp_path):
    from ping_llm.prepare import load_card

    other = _prepare([trained_run.canonical], tmp_path / "resplit", seed=1)  # other splits
    assert load_card(other)["splits"]["train"]["fingerprint"] != load_card(
        trained_run.data_dir)["splits"]["train"]["fingerprint"]
    with pytest.raises(InputError, match="different dataset"):
        ev.evaluate(other, trained_run.run_dir, None, **FAST)
    # checked on content, the run's train split does hold measurements of these test splits
    with pytest.raises(InputError, match="are in the train split the run was trained on"):
        ev.evaluate(other, trained_run.run_dir, None, allow_foreign_run=True, **FAST)


def test_eval_refuses_a_run_that_trained_on_a_test_split(trained_run, tmp_path):
    from ping_llm.prepare import load_card

    fp = load_card(trained_run.data_dir)["splits"]["test_time"]["fingerprint"]
    run = _copy_run(trained_run, tmp_path, fp)
    with pytest.raises(InputError, match="trained on the test_time split"):
        ev.evaluate(trained_run.data_dir, run, None, allow_foreign_run=True, **FAST)


def test_cli_eval_exits_2_for_a_run_without_a_recorded_fingerprint(trained_run, tmp_path, capsys):
    run = _copy_run(trained_run, tmp_path, None)
    rc = cli_main(["eval", "--data", str(trained_run.data_dir), "--run", str(run), "--out",
                   str(tmp_path / "rep"), "--no-progress"])
    assert rc == 2
    assert "fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "rep" / "report.html").exists()


def test_foreign_run_passes_when_its_train_data_is_disjoint(trained_run, tmp_path):
    from ping_llm.checkpoint import read_config
    from ping_llm.prepare import load_card
    from ping_llm.schema import read_canonical

    # the same kind of data a year later: no measurement in common with the run's train split
    t = read_canonical(trained_run.canonical)
    later = pa.compute.add(t["event_time"].cast(pa.int64()), 366 * 86400)
    t = t.set_column(0, "event_time", later.cast(pa.timestamp("s", tz="UTC")))
    (tmp_path / "later").mkdir()
    pq.write_table(t, tmp_path / "later" / "later.parquet")
    other = _prepare([tmp_path / "later"], tmp_path / "later-dataset")
    card = load_card(other)
    train = read_canonical(other / "splits" / "train.parquet")
    sets = {s: read_canonical(other / "splits" / f"{s}.parquet") for s in ev.EVAL_SPLITS}
    cfg = read_config(trained_run.run_dir)
    with pytest.raises(InputError):
        ev.check_leak(card, cfg, train, sets)
    info = ev.check_leak(card, cfg, train, sets, allow_foreign_run=True)
    assert info["mode"].startswith("content")
    assert info["foreign_train_measurements"] > 0
    assert all(v == 0 for v in info["overlap"].values())


def test_external_set_that_overlaps_train_is_refused(trained_run):
    with pytest.raises(InputError, match="also in this dataset's train"):
        ev.evaluate(trained_run.data_dir, trained_run.run_dir, None,
                    test_paths=[trained_run.data_dir / "splits" / "train.parquet"], **FAST)


def test_content_overlap_counts_exact_measurements():
    a = _table([("1.0.0.1", "2.0.0.1", 10.0, 100), ("1.0.0.1", "2.0.0.1", 10.5, 100),
                ("1.0.0.1", "2.0.0.1", -1.0, 200)])
    b = _table([("1.0.0.1", "2.0.0.1", 10.0, 100), ("1.0.0.1", "2.0.0.1", -1.0, 200),
                ("1.0.0.1", "2.0.0.1", -1.0, 200)])
    assert ev.content_overlap(a, b) == 2
    assert ev.content_overlap(a, b.slice(0, 0)) == 0


def test_recorded_fingerprint_is_found_in_either_layout():
    assert ev.recorded_train_fingerprint({"dataset": {"train_fingerprint": "sha256:a"}}) \
        == "sha256:a"
    card_like = {"data": {"card": {"splits": {"train": {"fingerprint": "sha256:b"},
                                              "test_time": {"fingerprint": "sha256:c"}}}}}
    assert ev.recorded_train_fingerprint(card_like) == "sha256:b"
    assert ev.recorded_train_fingerprint({"train": {"data_dir": "x"}}) is None
    with pytest.raises(InputError):
        ev.recorded_train_fingerprint({"a": {"train_fingerprint": "x"},
                                       "b": {"train_fingerprint": "y"}})


# ----------------------------------------------------------------------------------------------
# end to end on the session's tiny trained model


def test_eval_scores_every_test_split_against_baselines_and_truth(results, trained_run):
    from ping_llm.baselines import make_baselines
    from ping_llm.synth import world_path

    assert results["leak_check"]["mode"] == "fingerprint"
    assert all(v == 0 for v in results["leak_check"]["overlap"].values())
    # the world was found through card -> ingest metadata -> results file
    assert Path(results["synthetic"]["world_file"]) == world_path(trained_run.results)
    assert set(results["splits"]) <= set(ev.EVAL_SPLITS) and results["splits"]
    for split in results["splits"].values():
        assert 0 < split["n_evaluated"] <= 16 and split["n_total"] >= split["n_evaluated"]
        assert split["subsample"]["seed"] == 0
        names = set(split["methods"])
        assert {"model k=0", "model k=2", "truth"} | set(make_baselines()) <= names
        for k in (0, 2):
            m = split["methods"][f"model k={k}"]
            assert m["n"] == split["n_evaluated"]
            assert math.isfinite(m["median_ae_ms"]) and m["median_ae_ms"] >= 0
            assert 0 <= m["coverage_50"] <= m["coverage_90"] <= 1
            assert m["crps_cens_ms"] <= m["crps_ms"] + 1e-9
            assert m["context_mean"] <= k
            assert {"src", "dst", "time", "result"} <= set(m["nll"]["per_field"])
            assert "time" not in m["nll_no_time"]["per_field"]
            assert all(v >= 0 for v in m["nll"]["per_field"].values())
            assert "result.1" in m["nll"]["per_position"]  # byte1 of the RTT
            assert m["kl"]["kl_rtt"]["mean"] >= 0 and m["kl"]["kl_full"]["median"] >= 0
            a = m["timestamp_ablation"]
            assert a["gain_nats"] == pytest.approx(
                a["logp_result_with_time"] - a["logp_result_without_time"], abs=1e-9)
        # a 150-step model is far from the generator's own law
        assert split["methods"]["truth"]["logp_result"] > split["methods"]["model k=0"][
            "logp_result"]
        for b in make_baselines():
            m = split["methods"][b]
            assert 0 <= m["coverage"] <= 1
            assert m["fallback"]["n"] == split["n_evaluated"]
            assert m["covered"]["n"] == round(m["coverage"] * split["n_evaluated"])
        assert {"ip_version", "pair_seen_in_train", "source_seen_in_train"} == set(
            split["breakdowns"])
    if "test_probe" in results["splits"]:  # held-out sources are unseen by construction
        cells = results["splits"]["test_probe"]["breakdowns"]["source_seen_in_train"]
        assert set(cells) == {"0"}


def test_eval_numbers_recompute_from_the_per_query_predictions(results):
    for name, split in results["splits"].items():
        plot = results["plot_data"][name]
        ok = ~plot["failed"]
        for method in ("model k=0", "pair_median", "truth"):
            med = plot["methods"][method]["median"]
            sel = ok & np.isfinite(med)
            err = np.abs(med[sel] - plot["obs"][sel])
            m = split["methods"][method]
            m = m.get("fallback", m)
            assert m["median_ae_ms"] == pytest.approx(float(np.median(err)))
            assert m["mae_ms"] == pytest.approx(float(err.mean()))


def test_report_files_are_self_contained_and_consistent(results):
    out = Path(results["_out"])
    html = (out / "report.html").read_text()
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html)
    assert "<script" not in html.lower()
    imgs = re.findall(r"<img[^>]*src=\"([^\"]*)\"", html)
    assert len(imgs) >= 6 and all(s.startswith("data:image/png;base64,") for s in imgs)

    def no_nan(x):
        raise AssertionError(f"metrics.json holds {x}")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=no_nan)
    assert "plot_data" not in metrics

    # every cell of every summary table equals the metrics.json number, as displayed
    from ping_llm.report import COLUMNS

    md = (out / "summary.md").read_text()
    sections = re.split(r"^## (\w+):", md, flags=re.M)[1:]
    assert [sections[i] for i in range(0, len(sections), 2)] == list(metrics["splits"])
    checked = 0
    for name, body in zip(sections[::2], sections[1::2], strict=True):
        lines = body.splitlines()
        first = next(i for i, ln in enumerate(lines) if ln.startswith("| "))
        table = []
        for ln in lines[first:]:  # the first table of the section: the summary
            if not ln.startswith("|"):
                break
            if ln.startswith("| "):
                table.append(ln)
        header = [c.strip() for c in table[0].strip("|").split("|")]
        assert header[1:] == [c[0] for c in COLUMNS]
        for line in table[1:]:
            cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
            method, how = cells[0], "fallback"
            if method.endswith(" [covered]"):
                method, how = method[: -len(" [covered]")], "covered"
            m = metrics["splits"][name]["methods"][method]
            nums = m.get(how, m) if m.get("kind") == "baseline" else m
            for (_, key, _), cell in zip(COLUMNS, cells[1:], strict=True):
                value = m.get("coverage", 1.0) if key == "coverage" else nums.get(key)
                if cell == "–":
                    assert value is None
                    continue
                decimals = len(cell.split(".")[1]) if "." in cell else 0
                assert float(cell) == pytest.approx(value, abs=0.51 * 10 ** -decimals)
                checked += 1
    assert checked > 100


def test_eval_on_an_external_set_reports_what_train_has_seen(trained_run):
    test_pair = trained_run.data_dir / "splits" / "test_pair.parquet"
    res = ev.evaluate(trained_run.data_dir, trained_run.run_dir, None, test_paths=[test_pair],
                      max_queries=8, contexts=(0,), n_examples=0, progress=False)
    assert list(res["splits"]) == ["external"]
    seen = res["external"]["seen_in_train"]
    # test_pair holds pairs never in train, between sources and destinations that are
    assert seen["pairs"]["distinct_seen"] == 0
    assert seen["sources"]["distinct_seen_frac"] == 1.0
    assert seen["destinations"]["measurements_seen_frac"] == 1.0
    ext = res["splits"]["external"]
    assert ext["methods"]["pair_median"]["coverage"] == 0.0
    assert ext["n_evaluated"] == 8


def test_cli_eval_writes_the_report_and_prints_json(trained_run, tmp_path, capsys):
    out = tmp_path / "rep"
    rc = cli_main(["eval", "--data", str(trained_run.data_dir), "--run", str(trained_run.run_dir),
                   "--out", str(out), "--max-queries", "6", "--contexts", "0,1", "--examples",
                   "0", "--no-progress", "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["settings"]["contexts"] == [0, 1] and printed["settings"]["max_queries"] == 6
    assert all((out / f).is_file() for f in ("report.html", "summary.md", "metrics.json"))
    assert cli_main(["eval", "--data", str(trained_run.data_dir), "--run",
                     str(trained_run.run_dir), "--out", str(out), "--contexts", "0,x"]) == 2
