"""`ping-llm calibrate`: fit a run's calibration (`ping_llm.calibration`) on the val split.

The val queries are drawn and given context exactly as `ping-llm eval --splits val` does
(`evaluate.Queries.of`, `evaluate.ContextPool` over train, k in CONTEXTS pooled, so the map sees
every context size the report shows); the raw model's distributions give the randomised PITs of
the replies and P(failed) against the outcomes; the fitted map goes to RUN_DIR/calibration.json
with what it was fitted on (run step, val fingerprint, queries, contexts), and every
`Engine.load` of the run applies it from then on. Val coverage before and after is returned (and
printed by the CLI); after is in-sample by construction, the test splits are where it is judged.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ping_llm.calibration import Calibration
from ping_llm.errors import InputError
from ping_llm.evaluate import BYTE2_MASS, CONTEXTS, MAX_QUERIES, ContextPool, Queries
from ping_llm.leakcheck import check_leak
from ping_llm.scoring import GRID, dense_pmf, distribution_metrics

SPLIT = "val"


def _coverage(dm: dict) -> dict:
    ok = np.isfinite(dm["pit"])
    return {"coverage_50": float(np.mean(dm["in50"][ok])) if ok.any() else None,
            "coverage_90": float(np.mean(dm["in90"][ok])) if ok.any() else None}


def calibrate(data_dir, run_dir, *, max_queries: int = 2 * MAX_QUERIES, contexts=CONTEXTS,
              seed: int = 0, device: str = "cpu", progress: bool = True) -> dict:
    """Fit and save the run's calibration on `data_dir`'s val split; returns a summary."""
    from tqdm import tqdm

    from ping_llm.checkpoint import find_checkpoint, read_config, read_meta
    from ping_llm.prepare import load_card
    from ping_llm.query import Engine, Query
    from ping_llm.schema import read_canonical

    t0 = time.perf_counter()
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    card = load_card(data_dir)
    info = card["splits"].get(SPLIT) or {}
    if not info.get("measurements"):
        raise InputError(f"{data_dir} has no {SPLIT} split to calibrate on; prepare it with "
                         "--val-pair-fraction / --val-time-fraction above 0")
    train = read_canonical(data_dir / card["splits"]["train"]["parquet"])
    val = read_canonical(data_dir / info["parquet"])
    check_leak(card, read_config(run_dir), train, {SPLIT: val})
    step = read_meta(find_checkpoint(run_dir))["step"]
    engine = Engine.load(run_dir, device=device, calibrated=False, byte2_mass=BYTE2_MASS)
    q = Queries.of(val, max_queries, seed, SPLIT)
    pool = ContextPool(train)
    lo, p = pool.before(q.src, q.time)
    budget = engine.config.sequence_len - 50  # as evaluate: room for the query and its result
    rng = np.random.default_rng([seed, 0xCA1])
    per_k, pf_all, pmf_all, n_all = {}, [], [], []
    bar = tqdm(total=len(q) * len(contexts), desc="calibrate on val", unit="q",
               file=sys.stderr, disable=not progress)
    for k in contexts:
        ctxs = [pool.context(lo[i], p[i], k, budget) for i in range(len(q))]
        n_all.append(np.array([len(c) for c in ctxs]))
        qs = [Query(str(q.src[i]), str(q.dst[i]), int(q.time[i]), context=c)
              for i, c in enumerate(ctxs)]
        pf, pmf = [], []
        for s in range(0, len(qs), 64):
            a, b = dense_pmf(engine.rtt_many(qs[s : s + 64]))
            pf.append(a)
            pmf.append(b)
            bar.update(len(qs[s : s + 64]))
        pf_all.append(np.concatenate(pf))
        pmf_all.append(np.concatenate(pmf))
        per_k[k] = distribution_metrics(GRID, pmf_all[-1], q.obs, rng)
    bar.close()
    pit = np.concatenate([per_k[k]["pit"] for k in contexts])
    p_failed = np.concatenate(pf_all)
    failed = np.tile(q.failed, len(contexts))
    cal = Calibration.fit(pit, np.concatenate(n_all), p_failed, failed, fitted={
        "step": step, "data_dir": str(data_dir), "split": SPLIT,
        "split_fingerprint": info.get("fingerprint"), "queries": len(q),
        "contexts": list(contexts), "seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    path = cal.save(run_dir)
    summary = {"file": str(path), "step": step, "queries": len(q), "contexts": list(contexts),
               "replies": cal.fitted["replies"], "platt": {"a": cal.a, "b": cal.b},
               "val": {}}
    for j, k in enumerate(contexts):
        after_pmf = np.stack([cal.probs(row, n) for row, n in zip(pmf_all[j], n_all[j],
                                                                   strict=True)])
        after = distribution_metrics(GRID, after_pmf, q.obs, rng)
        summary["val"][f"k={k}"] = {"before": _coverage(per_k[k]), "after": _coverage(after)}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary
