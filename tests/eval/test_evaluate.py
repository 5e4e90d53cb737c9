"""The evaluation harness: query subsampling, context selection, the leak refusal end to end,
and a full evaluation of the session's tiny trained model (`trained_run`, conftest.py) on the
synthetic Internet, KL to the generator's truth included, with its report.

How predictions become numbers is tested in test_scoring.py, the formulas in test_metrics.py.
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

from ping_llm import tokens as tk
from ping_llm.cli import main as cli_main
from ping_llm.errors import InputError
from ping_llm.eval import evaluate as ev
from ping_llm.eval import queries as Q

FAST = dict(max_queries=16, contexts=(0, 2), n_examples=1, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


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
    from ping_llm.data.prepare import PrepareConfig, prepare

    prepare(inputs, out, PrepareConfig(seed=seed), progress=False)
    return out


@pytest.fixture(scope="module")
def results(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return ev.evaluate(trained_run.data_dir, trained_run.run_dir, out, **FAST)


# ----------------------------------------------------------------------------------------------
# aggregation on hand-made cases


def test_seen_bins_label_counts():
    labels = ev._bins(np.array([0, 1, 9, 10, 99, 100, 5000]), ev.PAIR_SEEN)
    assert labels.tolist() == ["0", "1-9", "1-9", "10-99", "10-99", "100+", "100+"]


def test_subsample_is_seeded_per_set_and_sorted():
    a = Q.subsample(10_000, 100, 0, "test_time")
    assert len(a) == 100 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, Q.subsample(10_000, 100, 0, "test_time"))
    assert not np.array_equal(a, Q.subsample(10_000, 100, 1, "test_time"))
    assert not np.array_equal(a, Q.subsample(10_000, 100, 0, "test_pair"))
    assert np.array_equal(Q.subsample(50, 100, 0, "x"), np.arange(50))
    assert np.array_equal(Q.subsample(50, None, 0, "x"), np.arange(50))


def test_context_is_the_most_recent_measurements_strictly_before_the_query(canonical_table):
    pool = Q.ContextPool(canonical_table([
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


def test_a_cold_context_is_the_sources_pings_to_other_destinations(canonical_table):
    rows = [("1.0.0.1", "2.0.0.1", 10.0, 100), ("1.0.0.1", "2.0.0.2", 11.0, 150),
            ("1.0.0.1", "2.0.0.1", 10.5, 200), ("1.0.0.1", "2.0.0.3", 12.0, 250)]
    own = Q.ContextPool(canonical_table(rows), other_destinations=True)
    lo, p = own.before(np.array(["1.0.0.1"], dtype=object), np.array([300]))
    # a query to 2.0.0.1 never sees that pair's own history, only the other destinations
    assert [(m.dst, m.time) for m in own.context(lo[0], p[0], 4, 10_000, "2.0.0.1")] == [
        ("2.0.0.2", 150), ("2.0.0.3", 250)]
    assert [m.time for m in own.context(lo[0], p[0], 1, 10_000, "2.0.0.1")] == [250]
    train = Q.ContextPool(canonical_table(rows))  # from train the pair's history is fair game
    assert len(train.context(lo[0], p[0], 4, 10_000, "2.0.0.1")) == 4


# ----------------------------------------------------------------------------------------------
# the model scorer against the query engine


# ----------------------------------------------------------------------------------------------
# the leak check


def _copy_run(trained_run, tmp_path, fingerprint) -> Path:
    run = tmp_path / "run-copy"
    shutil.copytree(trained_run.run_dir, run)
    _record_fingerprint(run, fingerprint)
    return run


def test_eval_refuses_a_run_trained_on_a_differently_split_dataset(trained_run, tmp_path):
    from ping_llm.data.prepare import load_card

    other = _prepare([trained_run.canonical], tmp_path / "resplit", seed=1)  # other splits
    assert load_card(other)["splits"]["train"]["fingerprint"] != load_card(
        trained_run.data_dir)["splits"]["train"]["fingerprint"]
    with pytest.raises(InputError, match="different dataset"):
        ev.evaluate(other, trained_run.run_dir, None, **FAST)
    # checked on content, the run's train split does hold measurements of these test splits
    with pytest.raises(InputError, match="are in the train split the run was trained on"):
        ev.evaluate(other, trained_run.run_dir, None, allow_foreign_run=True, **FAST)


def test_eval_refuses_a_run_that_trained_on_a_test_split(trained_run, tmp_path):
    from ping_llm.data.prepare import load_card

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
    from ping_llm.data.prepare import load_card
    from ping_llm.data.schema import read_canonical

    # the same kind of data a year later: no measurement in common with the run's train split
    t = read_canonical(trained_run.canonical)
    later = pa.compute.add(t["event_time"].cast(pa.int64()), 366 * 86400)
    t = t.set_column(0, "event_time", later.cast(pa.timestamp("s", tz="UTC")))
    (tmp_path / "later").mkdir()
    pq.write_table(t, tmp_path / "later" / "later.parquet")
    other = _prepare([tmp_path / "later"], tmp_path / "later-dataset")
    card = load_card(other)
    train = read_canonical(other / "splits" / "train.parquet")
    sets = {s: read_canonical(other / "splits" / f"{s}.parquet") for s in Q.EVAL_SPLITS}
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


# ----------------------------------------------------------------------------------------------
# end to end on the session's tiny trained model


def test_eval_scores_every_test_split_against_baselines_and_truth(results, trained_run):
    from ping_llm.data.synth import world_path
    from ping_llm.eval.baselines import make_baselines

    assert results.leak_check["mode"] == "fingerprint"
    assert all(v == 0 for v in results.leak_check["overlap"].values())
    # the world was found through card -> ingest metadata -> results file
    assert Path(results.synthetic["world_file"]) == world_path(trained_run.results)
    assert set(results.splits) <= set(Q.EVAL_SPLITS) and results.splits
    for split in results.splits.values():
        assert 0 < split.n_evaluated <= 16 and split.n_total >= split.n_evaluated
        assert split.subsample["seed"] == 0
        names = set(split.methods)
        plain = {n for n, b in make_baselines().items() if not getattr(b, "context_only", False)}
        assert {"model k=0", "model k=2", "truth"} | plain <= names
        for k in (0, 2):
            m = split.methods[f"model k={k}"]
            assert m["n"] == split.n_evaluated
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
        assert split.methods["truth"]["logp_result"] > split.methods["model k=0"][
            "logp_result"]
        for b in plain:
            m = split.methods[b]
            assert 0 <= m["coverage"] <= 1
            assert m["fallback"]["n"] == split.n_evaluated
            assert m["covered"]["n"] == round(m["coverage"] * split.n_evaluated)
        assert {"ip_version", "pair_seen_in_train", "source_seen_in_train"} == set(
            split.breakdowns)
    assert results.leak_check["split_invariants"]["violations"] == {}
    # a synthetic dataset: the geolocation baseline reads the world's own database
    assert results.baselines["geo_db"]["name"] == "ping-llm-synthetic-world-City"
    assert "test_probe" in results.splits
    probe = results.splits["test_probe"]  # held-out probes are unseen by construction
    assert set(probe.breakdowns["source_seen_in_train"]) == {"0"}
    # cold sources: every baseline that reads a context got the same k = 2 as the model
    for b in ("vivaldi", "dmfsgd", "biased_mf", "source_offset", "context_median", "geo",
              "source_failure_rate"):
        m = probe.methods[f"{b} k=2"]
        assert m["kind"] == "baseline" and m["context"] == 2 and m["point_only"]
        assert m["fallback"]["n"] == probe.n_evaluated
    assert "context_median" not in probe.methods  # only with a context
    # a P(failed)-only method shows no RTT numbers
    assert "median_ae_ms" not in probe.methods["source_failure_rate"]["fallback"]
    assert "roc_auc" in probe.methods["source_failure_rate k=2"]["fallback"]
    for name in ("test_time", "test_pair"):  # warm sources: no k rows for baselines
        assert not [n for n in (results.splits[name].methods if name in results.splits else {})
                    if " k=" in n and not n.startswith("model")]


def test_eval_numbers_recompute_from_the_per_query_predictions(results):
    for split in results.splits.values():
        plot = split.plot
        ok = ~plot.failed
        for method in ("model k=0", "pair_median", "truth"):
            med = plot.methods[method]["median"]
            sel = ok & np.isfinite(med)
            err = np.abs(med[sel] - plot.obs[sel])
            m = split.methods[method]
            m = m.get("fallback", m)
            assert m["median_ae_ms"] == pytest.approx(float(np.median(err)))
            assert m["mae_ms"] == pytest.approx(float(err.mean()))


def test_report_files_are_self_contained_and_consistent(results):
    out = Path(results.files["html"]).parent
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
    from ping_llm.eval.report import COLUMNS

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
    assert list(res.splits) == ["external"]
    seen = res.external["seen_in_train"]
    # test_pair holds pairs never in train, between sources and destinations that are
    assert seen["pairs"]["distinct_seen"] == 0
    assert seen["sources"]["distinct_seen_frac"] == 1.0
    assert seen["destinations"]["measurements_seen_frac"] == 1.0
    ext = res.splits["external"]
    assert ext.methods["pair_median"]["coverage"] == 0.0
    assert ext.n_evaluated == 8


def test_eval_context_from_the_external_set_inside_a_time_window(trained_run):
    """The transfer / drift protocol: a new set whose sources bring their own earlier pings."""
    import pyarrow.compute as pc

    from ping_llm.data.schema import read_canonical

    test_time = trained_run.data_dir / "splits" / "test_time.parquet"
    t = read_canonical(test_time)["event_time"].cast(pa.int64())
    mid = int((pc.min(t).as_py() + pc.max(t).as_py()) // 2)
    res = ev.evaluate(trained_run.data_dir, trained_run.run_dir, None, test_paths=[test_time],
                      max_queries=8, contexts=(0, 2), n_examples=0, progress=False,
                      context_from="test", test_since=mid)
    ext = res.splits["external"]
    assert ext.n_total == int(pc.sum(pc.greater_equal(t, mid)).as_py())
    assert ext.context_pool.startswith("own earlier external")
    assert res.settings.context_from == "test"
    assert "vivaldi k=2" in ext.methods and "source_offset k=2" in ext.methods
    with pytest.raises(InputError, match="inside --since"):
        ev.evaluate(trained_run.data_dir, trained_run.run_dir, None, test_paths=[test_time],
                    contexts=(0,), progress=False, test_since=2**40)
    with pytest.raises(InputError, match="context_from"):
        ev.evaluate(trained_run.data_dir, trained_run.run_dir, None, contexts=(0,),
                    progress=False, context_from="val")


def test_new_sources_are_fresh_random_addresses_one_per_source():
    src = np.array(["10.0.0.1", "2001:db8::1", "10.0.0.1", "192.0.2.9"], dtype=object)
    new = Q.new_sources(src, 0, "val")
    assert new[0] == new[2] and len(set(new)) == 3 and not set(new) & set(src)
    assert [":" in a for a in new] == [":" in a for a in src]
    assert list(Q.new_sources(src, 0, "val")) == list(new)  # seeded


def test_readdressed_val_asks_about_known_probes_as_if_never_seen(trained_run):
    """Cold start without holding probes out: every val source under a new address, its context
    its train pings to other destinations, which the in-context baselines read as well."""
    res = ev.evaluate(trained_run.data_dir, trained_run.run_dir, None, splits=("val",),
                      max_queries=12, contexts=(0, 2), n_examples=0, progress=False,
                      readdress=True)
    val = res.splits["val"]
    assert res.settings.readdress and val.readdressed_sources
    assert val.context_pool == "train, other destinations"
    assert "vivaldi k=2" in val.methods and "source_offset k=2" in val.methods
    seen = val.breakdowns["source_seen_in_train"]
    assert set(seen) == {"0"}  # no re-addressed source was ever in train
    assert val.methods["model k=2"]["context_mean"] > 0


def test_val_probe_asks_about_held_out_probes_with_their_own_context(trained_run):
    """The cold start that defaults are chosen on: probes never in train, under their real
    addresses, their context their own earlier val_probe pings, as test_probe's is."""
    res = ev.evaluate(trained_run.data_dir, trained_run.run_dir, None, splits=("val_probe",),
                      max_queries=12, contexts=(0, 2), n_examples=0, progress=False)
    vp = res.splits["val_probe"]
    assert vp.context_pool == "own earlier val_probe measurements to other destinations"
    assert not vp.readdressed_sources and "biased_mf k=2" in vp.methods
    assert set(vp.breakdowns["source_seen_in_train"]) == {"0"}
    assert vp.methods["model k=2"]["context_mean"] > 0


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
    # defaults are chosen on val, never on the test splits
    rc = cli_main(["eval", "--data", str(trained_run.data_dir), "--run", str(trained_run.run_dir),
                   "--out", str(tmp_path / "val"), "--splits", "val", "--max-queries", "4",
                   "--contexts", "0", "--examples", "0", "--no-progress", "--json"])
    assert rc == 0 and list(json.loads(capsys.readouterr().out)["splits"]) == ["val"]
    assert cli_main(["eval", "--data", str(trained_run.data_dir), "--run",
                     str(trained_run.run_dir), "--out", str(out), "--splits", "train"]) == 2
    # the plain-text summary names every method, failure-only ones by their ROC-AUC
    rc = cli_main(["eval", "--data", str(trained_run.data_dir), "--run", str(trained_run.run_dir),
                   "--out", str(tmp_path / "txt"), "--splits", "test_probe", "--max-queries", "4",
                   "--contexts", "0,1", "--examples", "0", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "source_failure_rate k=1" in text and "vivaldi k=1" in text


def test_kept_checkpoints_give_a_learning_curve_in_the_report(trained_run, tmp_path):
    """train --keep-every keeps earlier weights; eval scores each on the same queries (k = 0)."""
    from ping_llm import checkpoint as ck
    from ping_llm.config import TrainConfig
    from ping_llm.train import train

    run = tmp_path / "run"
    train(TrainConfig(data_dir=str(trained_run.data_dir), out_dir=str(run),
                      model={"n_layer": 1, "n_embd": 32, "n_head": 1, "sequence_len": 128},
                      steps=6, device_batch_size=4, eval_every=0, save_every=0, keep_every=3,
                      seq_warmup_frac=0))
    assert [p.name for p in ck.kept_checkpoints(run)] == ["step-0000003", "step-0000006"]
    res = ev.evaluate(trained_run.data_dir, run, tmp_path / "rep", splits=("val", "test_pair"),
                      max_queries=8, contexts=(0,), n_examples=0, progress=False)
    pts = res.learning_curve["points"]
    assert [(p["step"], p["set"]) for p in pts] == [(3, "val"), (3, "test_pair"),
                                                     (6, "val"), (6, "test_pair")]
    assert pts[0]["tokens_seen"] == 3 * 4 * 128 and all(p["n"] > 0 for p in pts)
    # the curve's last point is the final model on the same raw k=0 task as the main table
    assert all(np.isfinite(p["median_ae_ms"]) and p["crps_ms"] > 0 for p in pts)
    assert "Learning curve" in (tmp_path / "rep" / "report.html").read_text()
    without = ev.evaluate(trained_run.data_dir, trained_run.run_dir, None, splits=("val",),
                          max_queries=4, contexts=(0,), n_examples=0, progress=False)
    assert without.learning_curve is None  # nothing kept, nothing drawn
