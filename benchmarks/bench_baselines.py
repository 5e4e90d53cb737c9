"""Fit time and accuracy of every classic baseline, each compared with the global median.

Datasets (../shared/data):
- MENOG 2019 RIPE Atlas pings (~545k packets): time split, the last 20% of the time range is the
  test set (like `test_time`); every baseline is fitted on the first 80%; errors reported on
  covered rows and with the global-median fallback; ROC-AUC of P(failed) where available.
- Seattle (99 nodes) and PlanetLab (490 nodes) all-pairs median matrices: 20% of the pairs held
  out (seed 0); Vivaldi replays 300 Serf-style cycles (each node pings a random train peer),
  DMFSGD / BiasedMF fit the train pairs.

Prints a table plus one JSON line per dataset: {"bench": "baselines", "dataset", "methods":
{name: {fit_s, coverage, median_ae_ms, rel_p50, ratio_vs_global, ...}}}.

    python benchmarks/bench_baselines.py [--quick]   # --quick skips PlanetLab
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import orjson

from ping_llm.data.observations import Observations
from ping_llm.eval import metrics as M
from ping_llm.eval.baselines import (
    DMFSGD,
    BiasedMF,
    DestinationMedian,
    GlobalMedian,
    make_baselines,
    with_fallback,
)
from ping_llm.eval.vivaldi import Vivaldi

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load_menog() -> Observations:
    src, dst, rtt, t = [], [], [], []
    with gzip.open(DATA / "ripe_atlas_menog_2019" / "raw.jsonl.gz", "rb") as f:
        for line in f:
            r = orjson.loads(line)
            if not r.get("dst_addr") or not r.get("from"):
                continue
            for e in r.get("result") or []:
                if "dup" in e:
                    continue
                src.append(r["from"])
                dst.append(r["dst_addr"])
                rtt.append(float(e["rtt"]) if "rtt" in e else -1.0)
                t.append(r["timestamp"])
    return Observations(src, dst, rtt, t)


def load_matrix(name: str, scale: float) -> np.ndarray:
    path = DATA / "netlatency_seattle_planetlab" / f"{name}_median_over_time.tsv.gz"
    with gzip.open(path, "rt") as f:
        rows = [[np.nan if v == "NA" else float(v) for v in line.split()]
                for line in f if not line.startswith("#")]
    X = np.array(rows) * scale
    np.fill_diagonal(X, np.nan)
    return X


def row(name, m, fit_s, qs, qd, y, fallback, base_med):
    cov = m.coverage(qs, qd)
    p = m.predict(qs, qd)
    out = {"fit_s": round(fit_s, 3), "coverage": float(cov.mean())}
    if cov.any():
        c = M.point_error_summary(p[cov], y[cov])
        out.update(covered_median_ae_ms=c["median_ae_ms"], covered_rel_p50=c["rel_p50"])
    s = M.point_error_summary(with_fallback(p, fallback), y)
    out.update(median_ae_ms=s["median_ae_ms"], mae_ms=s["mae_ms"], rel_p50=s["rel_p50"],
               rel_p90=s["rel_p90"], ratio_vs_global=s["median_ae_ms"] / base_med)
    return out


def print_table(dataset: str, methods: dict) -> None:
    print(f"\n== {dataset}")
    print(f"{'method':18s} {'fit s':>7s} {'cov':>6s} {'medAE':>8s} {'MAE':>8s} {'rel50':>6s} "
          f"{'rel90':>6s} {'x global':>8s}")
    for name, r in methods.items():
        print(f"{name:18s} {r['fit_s']:7.2f} {r['coverage']:6.3f} {r['median_ae_ms']:8.2f} "
              f"{r['mae_ms']:8.2f} {r['rel_p50']:6.3f} {r['rel_p90']:6.3f} "
              f"{r['ratio_vs_global']:8.3f}" + (f"  AUC {r['roc_auc']:.3f}" if "roc_auc" in r
                                                 else ""))
    print(json.dumps({"bench": "baselines", "dataset": dataset, "methods": methods}))


def bench_menog() -> None:
    t0 = time.perf_counter()
    obs = load_menog()
    print(f"parsed MENOG: {len(obs)} packets in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    cut = obs.time.min() + 0.8 * (obs.time.max() - obs.time.min())
    tr = obs.time <= cut
    train = Observations(obs.src[tr], obs.dst[tr], obs.rtt[tr], obs.time[tr])
    te = ~tr & obs.ok
    qs, qd, y = obs.src[te], obs.dst[te], obs.rtt[te]
    fq_s, fq_d, failed = obs.src[~tr], obs.dst[~tr], ~obs.ok[~tr]
    fitted, times = {}, {}
    for name, m in make_baselines().items():
        t0 = time.perf_counter()
        fitted[name] = m.fit(train)
        times[name] = time.perf_counter() - t0
    gm = fitted["global_median"]
    base = M.point_error_summary(gm.predict(qs, qd), y)["median_ae_ms"]
    methods = {}
    for name, m in fitted.items():
        methods[name] = row(name, m, times[name], qs, qd, y, gm.median_ms, base)
        if hasattr(m, "predict_p_failed"):
            p = with_fallback(m.predict_p_failed(fq_s, fq_d), gm.p_failed)
            methods[name]["roc_auc"] = M.roc_auc(p, failed)
            methods[name]["pr_auc"] = M.average_precision(p, failed)
    n_upd = int(train.ok.sum())
    methods["vivaldi"]["us_per_packet"] = times["vivaldi"] / n_upd * 1e6
    print(f"train {int(tr.sum())} packets ({n_upd} ok), test {int(te.sum())} ok packets; "
          f"all baselines fitted in {sum(times.values()):.1f} s", file=sys.stderr)
    print_table("menog_2019_time_split", methods)


def bench_matrix(name: str, scale: float) -> None:
    X = load_matrix(name, scale)
    n = len(X)
    names = np.array([f"n{k}" for k in range(n)])
    i, j = np.nonzero(np.isfinite(X) & (X > 0))
    test = np.random.default_rng(0).random(len(i)) < 0.2
    tr_i, tr_j = i[~test], j[~test]
    pairs = Observations(names[tr_i], names[tr_j], X[tr_i, tr_j])
    rng = np.random.default_rng(0)
    order = np.argsort(tr_i, kind="stable")
    starts = np.searchsorted(tr_i[order], np.arange(n))
    counts = np.bincount(tr_i, minlength=n)
    src = np.tile(np.flatnonzero(counts), 300)
    dst = tr_j[order][starts[src] + rng.integers(0, counts[src])]
    stream = Observations(names[src], names[dst], X[src, dst], np.arange(len(src)))
    qs, qd, y = names[i[test]], names[j[test]], X[i[test], j[test]]
    gm = GlobalMedian().fit(pairs)
    base = M.point_error_summary(gm.predict(qs, qd), y)["median_ae_ms"]
    methods = {}
    for label, m, data in (("global_median", gm, pairs), ("dst_median", DestinationMedian(), pairs),
                           ("vivaldi", Vivaldi(), stream), ("dmfsgd", DMFSGD(), pairs),
                           ("biased_mf", BiasedMF(), pairs)):
        t0 = time.perf_counter()
        m.fit(data)
        methods[label] = row(label, m, time.perf_counter() - t0, qs, qd, y, gm.median_ms, base)
    methods["vivaldi"]["us_per_update"] = methods["vivaldi"]["fit_s"] / len(src) * 1e6
    print_table(f"{name}_heldout_pairs", methods)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip PlanetLab (the slow one)")
    args = ap.parse_args()
    bench_menog()
    bench_matrix("seattle", 1000.0)  # seconds in the file
    if not args.quick:
        bench_matrix("planetlab", 1.0)


if __name__ == "__main__":
    main()
