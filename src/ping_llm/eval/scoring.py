"""How per-query predictions become the numbers of the evaluation report (docs/evaluation.md).

`ping_llm.eval.evaluate` runs the model, the baselines and (on synthetic data) the generator's truth
on the same queries and hands per-query arrays to this module: teacher-forced token scores
(`generate.teacher_forced`, summarised by `nll_summary`), metrics of exact RTT distributions
(`distribution_metrics`), KL to the truth, baseline forecasts with their global-median fallback,
and the summaries that fill the report's tables (`summarize`, `breakdowns`). The formulas
themselves live in `ping_llm.eval.metrics`.

Metric definitions (units ms unless noted): `metrics.point_error_summary` of the median (MAE,
median absolute error, relative error p50/p90 with |err| / max(obs, 1 µs)); CRPS (`crps_pmf` on
the pmf for the model and the truth, `crps_quantiles` on a 40-level ladder for quantile baselines,
= absolute error for point-only baselines, a degenerate forecast), and the CRPS of forecast and
observation censored at 10 s (min(x, 10 s): a model's far-tail mass, e.g. 1e-4 at hours of
RTT, dominates the plain CRPS; `p_tail` is the mean P(rtt > 10 s | reply)); coverage of the central
50%/90% intervals [q.25, q.75] / [q.05, q.95] (closed; observations snapped to the RTT code grid,
the model's resolution); randomised PIT histogram (10 bins); ROC-AUC and PR-AUC (average
precision) of P(failed) against failed, plus the Brier score; KL in nats over the RTT codes given
a reply (model mass of byte1 bins the engine did not refine is spread evenly over the bin), over
the 256 byte1 bins, and over {failed} + codes.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa

from ping_llm import tokens as tk
from ping_llm.eval import metrics as M

CENSOR_MS = 10_000.0  # censored CRPS: forecasts and observations are min(x, 10 s)
LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)  # median and the central 50% / 90% intervals
BASELINE_LADDER = tuple((np.arange(40) + 0.5) / 40)  # quantile levels for baselines' CRPS
PIT_BINS = 10
# what a P(failed)-only row keeps
FAILURE_KEYS = ("n", "n_success", "n_failed", "roc_auc", "pr_auc", "brier", "failed_rate")
BLOCK = 64  # queries per dense (BLOCK, 33792) pmf block
GRID = tk.RTT_GRID_MS[tk.CANON_CODES]  # their RTTs in ms, ascending


# ----------------------------------------------------------------------------------------------
# teacher-forced scores (`generate.teacher_forced`) -> NLL per field and position


def nll_summary(scores: list[dict]) -> dict:
    """Mean NLL (nats) per field (summed over its tokens), per token within each field, per token
    position ("src.0" is the SRC role token, "src.1" the first address byte ...), and in total."""
    fields, ntok, pos = defaultdict(list), defaultdict(list), defaultdict(list)
    for s in scores:
        for f, v in s["fields"].items():
            fields[f].append(-v)
        for t, v in s["tokens"].items():
            pos[t].append(-v)
            ntok[t.split(".")[0]].append(-v)
    order = ("start", "src", "dst", "time", "result")
    return {"per_field": {f: finite_mean(fields[f]) for f in order if f in fields},
            "per_token_by_field": {f: finite_mean(ntok[f]) for f in order if f in ntok},
            "per_position": {t: finite_mean(v) for t, v in pos.items()},
            "total": finite_mean([-sum(s["fields"].values()) for s in scores])}


# ----------------------------------------------------------------------------------------------
# distributions -> per-query metrics


def dense_pmf(dists) -> tuple[np.ndarray, np.ndarray]:
    """RTTDistributions -> (p_failed (N,), pmf (N, 33792) over GRID given a reply)."""
    pmf = np.zeros((len(dists), len(tk.CANON_CODES)))
    pos = np.searchsorted(tk.CANON_CODES, np.arange(65536))
    for i, d in enumerate(dists):
        pmf[i, pos[d.codes.astype(np.int64)]] = d.probs
    return np.array([d.p_failed for d in dists]), pmf


def spread_coarse(pmf: np.ndarray) -> np.ndarray:
    """Byte1 bins holding a single code with mass (bins the engine did not refine to byte2: all
    their mass sits on the centre code) get that mass spread evenly over the bin's 256 codes."""
    p = pmf.reshape(len(pmf), -1, 256).copy()
    coarse = (np.count_nonzero(p, axis=2) == 1)[..., None]
    p = np.where(coarse, p.sum(axis=2, keepdims=True) / 256.0, p)
    return p.reshape(pmf.shape)


DIST_KEYS = ("crps", "crps_cens", "pit", "in50", "in90", "p_tail")


def distribution_metrics(grid, pmf, obs, rng) -> dict:
    """Per-row metrics of pmf rows (N, G) on `grid` against obs (N,) ms (NaN = failed ping):
    quantiles at LEVELS, CRPS, randomised PIT and 50/90% central-interval hits (obs snapped to
    the RTT code grid). Failed rows get NaN everywhere except the quantiles."""
    n = len(obs)
    q = M.quantiles_from_pmf(grid, pmf, LEVELS) if n else np.zeros((0, len(LEVELS)))
    out = {k: np.full(n, np.nan) for k in ("crps", "crps_cens", "pit", "in50", "in90")}
    out["q"] = q
    out["p_tail"] = pmf[:, np.asarray(grid) > CENSOR_MS].sum(axis=1) / pmf.sum(axis=1)
    ok = np.isfinite(obs)
    if ok.any():
        y = obs[ok]
        snap = tk.code_to_rtt(tk.rtt_to_code(y))
        out["crps"][ok] = M.crps_pmf(grid, pmf[ok], y)
        out["crps_cens"][ok] = M.crps_pmf(np.minimum(grid, CENSOR_MS), pmf[ok],
                                          np.minimum(y, CENSOR_MS))
        out["pit"][ok] = M.pit_pmf(grid, pmf[ok], snap, rng)
        out["in50"][ok] = (q[ok, 1] <= snap) & (snap <= q[ok, 3])
        out["in90"][ok] = (q[ok, 0] <= snap) & (snap <= q[ok, 4])
    return out


def truth_pdf(truth, rows) -> tuple[np.ndarray, np.ndarray]:
    """(P(failed) (R,), pmf (R, 33792) over GRID given a reply) of truth rows."""
    t = truth[rows]
    pdf = t.pdf_codes()[:, tk.CANON_CODES]
    return t.p_fail, pdf / pdf.sum(axis=1, keepdims=True)


def truth_pass(truth, tix: np.ndarray, q, rng) -> dict:
    """The generator's own distribution as a forecaster (rows without truth: NaN)."""
    n = len(q)
    out = {k: np.full(n, np.nan) for k in ("median", "p_failed", "logp") + DIST_KEYS}
    has = np.flatnonzero(tix >= 0)
    codes = np.searchsorted(tk.CANON_CODES, tk.rtt_to_code(np.maximum(q.rtt, 0)).astype(np.int64))
    for s in range(0, len(has), BLOCK):
        rows = has[s:s + BLOCK]
        pf, pdf = truth_pdf(truth, tix[rows])
        dm = distribution_metrics(GRID, pdf, q.obs[rows], rng)
        out["median"][rows] = dm["q"][:, 2]
        for k in DIST_KEYS:
            out[k][rows] = dm[k]
        out["p_failed"][rows] = pf
        p_obs = np.where(q.failed[rows], pf, (1 - pf) * pdf[np.arange(len(rows)), codes[rows]])
        out["logp"][rows] = np.log(np.maximum(p_obs, 1e-300))
    return out


def kl_to_truth(tpf, tpdf, pf, pmf) -> dict:
    """KL(true || model) per row: RTT codes given a reply (coarse bins spread), byte1 bins, and
    {failed} + codes."""
    mp = spread_coarse(pmf)
    b1 = (tpdf.reshape(len(tpdf), -1, 256).sum(2), pmf.reshape(len(pmf), -1, 256).sum(2))
    return {"kl_rtt": M.kl_divergence(tpdf, mp), "kl_byte1": M.kl_divergence(*b1),
            "kl_full": M.kl_divergence(np.c_[tpf, (1 - tpf)[:, None] * tpdf],
                                       np.c_[pf, (1 - pf)[:, None] * mp])}


# ----------------------------------------------------------------------------------------------
# per-query arrays -> summaries (the rows of the report tables)


def finite_mean(x) -> float:
    """Mean of the finite values (NaN marks "not applicable to this row"); NaN if none."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else float("nan")


def finite_median(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else float("nan")


PER_QUERY = ("median", "crps", "crps_cens", "in50", "in90", "pit", "p_failed", "logp", "p_tail")


def summarize(obs, failed, rows: dict, sel=None) -> dict:
    """One method's metrics over a set of queries. obs (N,) ms (ignored where failed), failed
    (N,) bool; rows: per-query arrays (N,) by PER_QUERY name, "median" required (predicted ms),
    the others optional: CRPS and censored CRPS (ms), central-interval hits in50/in90 (1/0),
    PIT, P(failed), log P(observed result), P(rtt > 10 s | reply). sel: a row mask or indices.
    RTT metrics are over the successful rows, failure metrics over all rows."""
    obs, failed = np.asarray(obs, dtype=np.float64), np.asarray(failed, dtype=bool)
    r = {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()
         if k in PER_QUERY and v is not None}
    if sel is not None:
        obs, failed, r = obs[sel], failed[sel], {k: v[sel] for k, v in r.items()}
    answered = np.isfinite(r["median"])  # NaN: no prediction for this row (truth off-world)
    obs, failed, r = obs[answered], failed[answered], {k: v[answered] for k, v in r.items()}
    ok = ~failed
    out = {"n": int(len(failed)), "n_success": int(ok.sum()), "n_failed": int(failed.sum())}
    pe = M.point_error_summary(r["median"][ok], obs[ok])
    out.update({k: v for k, v in pe.items() if k != "n"})
    for key, name in (("crps", "crps_ms"), ("crps_cens", "crps_cens_ms"),
                      ("in50", "coverage_50"), ("in90", "coverage_90"), ("p_tail", "p_tail")):
        if key in r:
            out[name] = finite_mean(r[key][ok] if key != "p_tail" else r[key])
    if "pit" in r and ok.any():
        out["pit_hist"] = M.pit_histogram(r["pit"][ok][np.isfinite(r["pit"][ok])],
                                          PIT_BINS)[0].tolist()
    if "p_failed" in r:
        p = r["p_failed"]
        out.update(roc_auc=M.roc_auc(p, failed), pr_auc=M.average_precision(p, failed),
                   brier=float(np.mean((p - failed) ** 2)) if len(p) else float("nan"),
                   mean_p_failed=finite_mean(p),
                   failed_rate=float(failed.mean()) if len(p) else float("nan"))
    if "logp" in r:
        out["logp_result"] = finite_mean(r["logp"])
    return out


def breakdowns(groups: dict, obs, failed, methods: dict) -> dict:
    """groups: kind -> (N,) labels; methods: name -> per-query arrays (see `summarize`).
    -> kind -> label -> method -> point error, CRPS and log P of that cell."""
    out = {}
    for kind, labels in groups.items():
        out[kind] = {}
        for lab in sorted(set(labels.tolist()), key=str):
            sel = labels == lab
            out[kind][str(lab)] = {
                name: summarize(obs, failed, {k: m.get(k) for k in ("median", "crps", "logp")},
                                sel)
                for name, m in methods.items()}
    return out


def fit_baselines(train: pa.Table, progress: bool = True, geo_db=None) -> tuple[dict, dict]:
    """make_baselines(geo_db) fitted on the train table -> (fitted, seconds per baseline)."""
    from ping_llm.data.observations import Observations
    from ping_llm.eval.baselines import make_baselines

    obs = Observations.from_table(train)
    fitted, secs = {}, {}
    for name, b in make_baselines(geo_db).items():
        t0 = time.perf_counter()
        fitted[name] = b.fit(obs)
        secs[name] = round(time.perf_counter() - t0, 3)
        if progress:
            print(f"eval: fitted {name} in {secs[name]:.1f} s", file=sys.stderr)
    return fitted, secs


def _point_crps(med, y, ok) -> dict:
    """CRPS (plain and censored at 10 s) of point forecasts: a point mass's CRPS is the absolute
    error. NaN on failed pings."""
    return {"crps": np.where(ok, np.abs(med - y), np.nan),
            "crps_cens": np.where(ok, np.abs(np.minimum(med, CENSOR_MS)
                                             - np.minimum(y, CENSOR_MS)), np.nan)}


def baseline_predictions(fitted: dict, src, dst, obs, failed) -> dict:
    """name -> per-query arrays on every query with the global-median fallback (median, crps,
    crps_cens, in50/in90 and p_failed where the method has them) + `covered` (N,) bool."""
    g = fitted["global_median"]
    one = np.asarray(src[:1]), np.asarray(dst[:1])
    g_q = g.predict_quantiles(*one, LEVELS)[0] if len(src) else None
    g_lad = g.predict_quantiles(*one, BASELINE_LADDER)[0] if len(src) else None
    ok = ~np.asarray(failed, dtype=bool)
    y = np.where(ok, obs, 0.0)
    yc = np.minimum(y, CENSOR_MS)
    out = {}
    for name, b in fitted.items():
        cov = b.coverage(src, dst)
        med = np.where(cov, b.predict(src, dst), g.median_ms)
        row = {"covered": cov, "median": med}
        if hasattr(b, "predict_quantiles"):
            q = np.where(cov[:, None], b.predict_quantiles(src, dst, LEVELS), g_q)
            lad = np.where(cov[:, None], b.predict_quantiles(src, dst, BASELINE_LADDER), g_lad)
            row["crps"], row["crps_cens"] = np.full(len(y), np.nan), np.full(len(y), np.nan)
            row["crps"][ok] = M.crps_quantiles(BASELINE_LADDER, lad[ok], y[ok])
            row["crps_cens"][ok] = M.crps_quantiles(BASELINE_LADDER,
                                                    np.minimum(lad[ok], CENSOR_MS), yc[ok])
            row["in50"] = np.where(ok, (q[:, 1] <= y) & (y <= q[:, 3]), np.nan)
            row["in90"] = np.where(ok, (q[:, 0] <= y) & (y <= q[:, 4]), np.nan)
        else:  # a point forecast
            row.update(_point_crps(med, y, ok), point_only=True)
        if hasattr(b, "predict_p_failed"):
            pf = np.where(cov, b.predict_p_failed(src, dst), np.nan)
            row["p_failed"] = np.where(np.isnan(pf), g.p_failed, pf)
        if getattr(b, "p_failed_only", False):  # its RTT columns are the global median's
            row["p_failed_only"] = True
        out[name] = row
    return out


def context_baseline_predictions(fitted: dict, src, dst, contexts: list, obs, failed,
                                 plain: dict) -> dict:
    """name -> per-query arrays of the baselines that read a context (`predict_in_context`,
    `p_failed_in_context`), given the same k context measurements (`observations.SourceContext`
    per query) as the model. Medians are point forecasts (CRPS = absolute error); where a baseline
    cannot answer from the context it falls back to its plain row (`plain`, from
    `baseline_predictions`), which itself falls back to the global median."""
    ok = ~np.asarray(failed, dtype=bool)
    y = np.where(ok, obs, 0.0)
    out = {}
    for name, b in fitted.items():
        reads_rtt, reads_fail = hasattr(b, "predict_in_context"), hasattr(b, "p_failed_in_context")
        if not (reads_rtt or reads_fail):
            continue
        base = plain[name]
        row = {"covered": base["covered"], "median": base["median"], "point_only": True,
               "p_failed_only": base.get("p_failed_only", False)}
        if reads_rtt:
            m = np.asarray(b.predict_in_context(src, dst, contexts), dtype=np.float64)
            use = np.isfinite(m)
            row["median"] = np.where(use, m, base["median"])
            row["covered"] = base["covered"] | use
        row.update(_point_crps(row["median"], y, ok))
        if reads_fail:
            row["covered"] = row["covered"] | np.array([len(c) > 0 for c in contexts], bool)
            pf = np.asarray(b.p_failed_in_context(src, dst, contexts), dtype=np.float64)
            row["p_failed"] = np.where(np.isnan(pf), base.get("p_failed", np.nan), pf)
        elif "p_failed" in base:
            row["p_failed"] = base["p_failed"]
        out[name] = row
    return out


def baseline_summary(row: dict, obs, failed) -> dict:
    """A baseline's metrics on all queries with the global-median fallback (top level, and again
    under "fallback") and on the queries it covers ("covered"). A failure-only predictor
    (`p_failed_only`) keeps just its failure metrics: its RTT numbers would be the fallback's."""
    cov = row["covered"]
    fallback, covered = summarize(obs, failed, row), summarize(obs, failed, row, cov)
    if row.get("p_failed_only"):
        fallback, covered = ({k: v for k, v in x.items() if k in FAILURE_KEYS}
                             for x in (fallback, covered))
    return {**fallback, "kind": "baseline",  # top level: all queries, like the other methods
            "coverage": float(cov.mean()) if len(cov) else float("nan"),
            "point_only": bool(row.get("point_only", False)),
            "p_failed_only": bool(row.get("p_failed_only", False)),
            "covered": covered, "fallback": fallback}
