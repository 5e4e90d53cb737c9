"""Learning curves: how the model's abilities appear during training.

A run trained with `--keep-every N` keeps the weights of every N-th step in RUN/kept/. `eval`
then scores each of them, and the final checkpoint, on the same queries of every evaluated set
without context (k = 0) and without calibration (which is fitted for the final step only):
median absolute error of the predicted median and CRPS (censored at 10 s, as in the report's
tables), against the tokens the run had seen. The queries are a fixed subsample (`CURVE_QUERIES`
per set, the same seed for every checkpoint), so the points differ only by the weights.
"""

from __future__ import annotations

import numpy as np

from ping_llm import checkpoint as ck
from ping_llm.eval.scoring import dense_pmf, distribution_metrics
from ping_llm.query.engine import Engine
from ping_llm.query.targets import Query

CURVE_QUERIES = 300  # per set and checkpoint: a curve of 10 points x 4 sets is 12k queries
BLOCK = 256  # queries per engine call


def learning_curve(run_dir, sets: dict, grid, device="cpu", max_queries=CURVE_QUERIES,
                   seed: int = 0, geo_db=None) -> dict | None:
    """{"points": [{step, tokens_seen, set, median_ae_ms, crps_ms, n}, ...]} over the run's kept
    checkpoints and its latest one; None when it kept none. sets: name -> `queries.Queries`."""
    kept = ck.kept_checkpoints(run_dir)
    if not kept:
        return None
    latest = ck.find_checkpoint(run_dir)
    last_kept = ck.read_meta(kept[-1])["step"]
    dirs = kept + ([latest] if latest is not None and ck.read_meta(latest)["step"] > last_kept
                   else [])
    rng = np.random.default_rng(seed)
    points = []
    for d in dirs:
        meta = ck.read_meta(d)
        model, _ = ck.load_model(d, device, geo_db=geo_db)
        engine = Engine(model)
        for name, q in sets.items():
            n = min(len(q), max_queries)
            ae, crps = [], []
            for s in range(0, n, BLOCK):
                rows = range(s, min(n, s + BLOCK))
                qs = [Query(str(q.src[i]), str(q.dst[i]), int(q.time[i])) for i in rows]
                _, pmf = dense_pmf(engine.rtt_many(qs))
                obs = q.obs[list(rows)]
                dm = distribution_metrics(grid, pmf, obs, rng)
                ok = np.isfinite(obs)
                ae.extend(np.abs(dm["q"][ok, 2] - obs[ok]))
                crps.extend(dm["crps_cens"][ok])
            points.append({
                "step": int(meta["step"]),
                "tokens_seen": int(meta.get("trainer", {}).get("tokens_seen", 0)),
                "set": name,
                "median_ae_ms": float(np.median(ae)) if ae else float("nan"),
                "crps_ms": float(np.mean(crps)) if crps else float("nan"),
                "n": len(ae),
            })
    return {"points": points, "queries_per_set": max_queries, "context": 0,
            "calibrated": False}
