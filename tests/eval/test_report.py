"""The report: formatting, strict JSON, a self-contained HTML page, and tables that show exactly the
numbers of metrics.json. Built from small hand-made results (no model needed); the
end-to-end report of a real evaluation is checked in test_evaluate.py."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from ping_llm.eval import report
from ping_llm.eval import scoring as S
from ping_llm.eval.results import EvalResults, RunInfo, SetPlot, SetResult, Settings


def _results(with_truth: bool = True, with_examples: bool = True) -> EvalResults:
    rng = np.random.default_rng(0)
    n = 200
    obs = rng.lognormal(3, 0.5, n)
    failed = rng.random(n) < 0.1
    obs[failed] = np.nan
    methods, plot_methods = {}, {}
    for k in (0, 4):
        med = np.where(failed, 30.0, obs * rng.lognormal(0, 0.3 / (k + 1), n))
        rows = {"median": med, "crps": np.abs(med - np.nan_to_num(obs)) * 0.8,
                "crps_cens": np.abs(med - np.nan_to_num(obs)) * 0.7,
                "in50": (rng.random(n) < 0.5).astype(float),
                "in90": (rng.random(n) < 0.9).astype(float), "pit": rng.random(n),
                "p_failed": np.clip(failed * 0.3 + rng.random(n) * 0.2, 0, 1),
                "logp": -rng.random(n) * 5, "p_tail": np.full(n, 1e-5)}
        s = S.summarize(obs, failed, rows)
        s.update(kind="model", context=k, context_mean=float(k), context_full_frac=1.0,
                 nll={"per_field": {"src": 3.0, "dst": 2.0, "time": 5.0, "result": 4.0},
                      "total": 14.0},
                 timestamp_ablation={"logp_result_with_time": -4.0,
                                     "logp_result_without_time": -4.2, "gain_nats": 0.2,
                                     "logp_rtt_with_time": -4.5, "logp_rtt_without_time": -4.8})
        if with_truth:
            s["kl"] = {x: {"mean": 0.5, "median": 0.3} for x in ("kl_rtt", "kl_byte1",
                                                                 "kl_full")}
        methods[f"model k={k}"] = s
        plot_methods[f"model k={k}"] = {"median": med, "p_failed": rows["p_failed"],
                                        "pit": rows["pit"], "kl_rtt": rng.random(n)}
    if with_truth:
        rows = {"median": np.where(failed, 30.0, obs), "p_failed": failed * 0.5 + 0.01}
        methods["truth"] = {**S.summarize(obs, failed, rows), "kind": "truth", "coverage": 1.0}
        plot_methods["truth"] = {"median": rows["median"], "p_failed": rows["p_failed"],
                                 "pit": rng.random(n)}
    cov = rng.random(n) < 0.6
    brow = {"covered": cov, "median": np.where(cov, np.nan_to_num(obs, nan=25.0) + 1, 25.0),
            "crps": np.full(n, 3.0), "crps_cens": np.full(n, 3.0), "point_only": True}
    methods["vivaldi"] = S.baseline_summary(brow, obs, failed)
    plot_methods["vivaldi"] = {"median": brow["median"], "p_failed": None, "covered": cov}
    groups = {"ip_version": np.where(rng.random(n) < 0.7, "IPv4", "IPv6").astype(object)}
    ex = [{"src": "192.0.2.1", "dst": "198.51.100.1", "n": 50,
           "rtt": list(rng.lognormal(3, .2, 50)), "failed_frac": 0.02,
           "model": {"0": {"p_byte1": list(rng.dirichlet(np.ones(132))), "p_failed": 0.05}},
           "truth": {"p_byte1": list(rng.dirichlet(np.ones(132))), "p_failed": 0.01}
           if with_truth else None}] if with_examples else []
    split = SetResult(
        n_total=5000, n_evaluated=n, n_failed=int(failed.sum()), context_pool="train",
        methods=methods,
        breakdowns=S.breakdowns(groups, obs, failed,
                                {"model k=0": {"median": plot_methods["model k=0"]["median"]},
                                 "vivaldi": brow}),
        plot=SetPlot(obs, failed, plot_methods, ex))
    return EvalResults(
        created="2026-01-01T00:00:00Z", data_dir="d", run_dir="r",
        run=RunInfo(step=10, preset="tiny"),
        settings=Settings(max_queries=n, seed=0, contexts=[0, 4], device="cpu"),
        leak_check={"mode": "fingerprint", "dataset_train_fingerprint": "sha256:x"},
        synthetic={"world_file": "w.world.json", "fingerprint": "f"} if with_truth else None,
        timings={"total_s": 1.0}, splits={"test_time": split})


def test_fmt_shows_missing_as_a_dash_and_scales_decimals():
    assert report.fmt(None) == "–" and report.fmt(float("nan")) == "–"
    assert report.fmt(1234.567) == "1234.6"
    assert report.fmt(12.345) == "12.35"  # 12.345 is 12.3449999... in binary
    assert report.fmt(0.12345) == "0.123"
    assert report.fmt(0.5, "frac") == "0.500"
    assert report.fmt(17, "int") == "17"


def test_json_safe_makes_strict_json():
    out = report.json_safe({"a": np.float32(1.5), "b": np.array([1.0, np.nan]), "c": math.inf,
                            3: (np.int64(2),)})
    assert out == {"a": 1.5, "b": [1.0, None], "c": None, "3": [2]}
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize("with_truth,with_examples", [(True, True), (False, False)])
def test_write_report_makes_three_self_contained_files(tmp_path, with_truth, with_examples):
    paths = report.write_report(_results(with_truth, with_examples), tmp_path)
    assert set(paths) == {"metrics", "summary", "html"}
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    imgs = re.findall(r"<img[^>]*src=\"([^\"]*)\"", html)
    n_expected = 6 + int(with_truth) + int(with_examples)  # context, cdf, calib, rel, nll (+kl, ex)
    assert len(imgs) == n_expected - 1
    assert all(s.startswith("data:image/png;base64,") and len(s) > 1000 for s in imgs)
    metrics = json.loads((tmp_path / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert "plot_data" not in metrics
    assert ("KL(true || model), nats:" in (tmp_path / "summary.md").read_text()) == with_truth


def test_summary_table_cells_are_the_metrics_numbers(tmp_path):
    res = _results()
    report.write_report(res, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    md = (tmp_path / "summary.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    keys = {h: key for h, key, _ in report.COLUMNS}
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if cells[0] == "context k":
            break
        rows[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    assert list(rows) == ["model k=0", "model k=4", "truth", "vivaldi", "vivaldi [covered]"]
    m = metrics["splits"]["test_time"]["methods"]
    assert rows["model k=4"]["MAE ms"] == report.fmt(m["model k=4"]["mae_ms"])
    assert rows["vivaldi"]["n"] == str(m["vivaldi"]["fallback"]["n"])
    assert rows["vivaldi [covered]"]["n"] == str(m["vivaldi"]["covered"]["n"])
    assert rows["vivaldi"]["cov 50%"] == "–"  # a point forecast has no interval
    assert rows["truth"][next(h for h in keys if keys[h] == "roc_auc")] == report.fmt(
        m["truth"]["roc_auc"], "frac")
    # the lowest median error over all queries (truth aside) is bold
    best = min(("model k=0", "model k=4", "vivaldi"),
               key=lambda r: m[r].get("median_ae_ms", m[r].get("fallback", {}).get(
                   "median_ae_ms")))
    assert rows[best]["median AE ms"].startswith("**")
    assert sum(r["median AE ms"].startswith("**") for r in rows.values()) == 1


def test_verdict_compares_the_best_model_setting_with_the_best_baseline():
    split = _results().splits["test_time"]
    m = split.methods
    best_model = min(("model k=0", "model k=4"), key=lambda n: m[n]["median_ae_ms"])
    v = report.verdict(split)
    assert v.startswith(f"Best model setting {best_model}")
    a, b = m[best_model]["median_ae_ms"], m["vivaldi"]["fallback"]["median_ae_ms"]
    assert ("beats" in v) == (a < b) and ("loses to" in v) == (a > b)
