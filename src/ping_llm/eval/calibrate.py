"""`ping-llm calibrate`: fit a run's calibration (`ping_llm.query.calibration`) on the val splits.

The val queries are drawn and given context exactly as `ping-llm eval --splits val` does
(`queries.Queries.of`, `queries.ContextPool` over train, k in CONTEXTS pooled, so the maps see
every context size the report shows), again with their sources re-addressed as `eval
--readdress-sources` does, and the val_probe split's as `eval --splits val_probe` does (new
sources: the cold start, random and real addresses); the raw model's distributions give the
randomised PITs of the replies and P(failed) against the outcomes; the fitted maps go to
RUN_DIR/calibration.json with what they were fitted on (run step, val fingerprint, queries,
contexts, populations), and every `Engine.load` of the run applies them from then on. Val
coverage before and after is returned (and printed by the CLI) per population; after is in-sample
by construction, the test splits are where it is judged.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.compute as pc

from ping_llm.data.splits import CHOICE_SPLITS
from ping_llm.errors import InputError
from ping_llm.eval.config import BYTE2_MASS
from ping_llm.eval.leakcheck import check_leak
from ping_llm.eval.queries import (
    CONTEXTS,
    MAX_QUERIES,
    ContextPool,
    Queries,
    new_sources,
    real_knowledge,
    with_source,
)
from ping_llm.eval.scoring import GRID, dense_pmf, distribution_metrics
from ping_llm.query.calibration import Calibration, pair_keys

# val: known probes (the known-sources and re-addressed new-sources questions); val_probe: new
# probes under their real addresses (the new-probes question), where the dataset has it
SPLIT, COLD_SPLIT = CHOICE_SPLITS


class Asked(NamedTuple):
    """One question put to the raw model: a split's queries, asked with this context."""

    split: str
    queries: Queries
    pool: ContextPool
    new_src: np.ndarray | None  # the sources' new addresses (re-addressed), or None: as they are
    populations: np.ndarray  # (N,) the population each query's outcome is fitted for


def _coverage(dm: dict) -> dict:
    ok = np.isfinite(dm["pit"])
    return {"coverage_50": float(np.mean(dm["in50"][ok])) if ok.any() else None,
            "coverage_90": float(np.mean(dm["in90"][ok])) if ok.any() else None}


def known_of(train) -> tuple[list, np.ndarray]:
    """What a run trained on, as the calibration tells populations apart: the train split's
    source addresses and the `pair_keys` of its (source, destination) address pairs."""
    pairs = train.select(["src_addr", "dst_addr"]).group_by(["src_addr", "dst_addr"]).aggregate([])
    return (pc.unique(train["src_addr"]).to_pylist(),
            pair_keys(pairs["src_addr"].to_pylist(), pairs["dst_addr"].to_pylist()))


def populations(src, dst, sources, pairs) -> np.ndarray:
    """Each query's population, as `Calibration.population` decides it at query time: "known"
    (a train pair), "new_pair" (a train source, another destination: val's held-out pairs) or
    "new" (a val probe that renumbered after the cut is a new source too)."""
    src, dst = np.asarray(src).astype(str), np.asarray(dst).astype(str)
    is_src = np.isin(src, np.asarray(sources, dtype=str))
    is_pair = np.isin(pair_keys(src, dst), pairs)
    return np.where(is_src & is_pair, "known", np.where(is_src, "new_pair", "new"))


def raw_distributions(engine, q, pool, contexts, budget, rng, new_src, bar) -> dict:
    """Raw distributions of the queries q at every k: PITs, P(failed), context sizes, pmfs
    (lists over contexts). new_src: None (the sources as they are) or their new addresses
    (queries and contexts)."""
    from ping_llm.query.targets import Query

    lo, p = pool.before(q.src, q.time)
    src = q.src if new_src is None else new_src
    out = {"pit": [], "p_failed": [], "n_context": [], "pmf": [], "metrics": []}
    for k in contexts:
        ctxs = [with_source(pool.context(lo[i], p[i], k, budget, str(q.dst[i])), str(src[i]))
                for i in range(len(q))]
        qs = [Query(str(src[i]), str(q.dst[i]), int(q.time[i]), context=c)
              for i, c in enumerate(ctxs)]
        pf, pmf = [], []
        with real_knowledge(engine, src, q.src):
            for s in range(0, len(qs), 64):
                a, b = dense_pmf(engine.rtt_many(qs[s : s + 64]))
                pf.append(a)
                pmf.append(b)
                bar.update(len(qs[s : s + 64]))
        dm = distribution_metrics(GRID, np.concatenate(pmf), q.obs, rng)
        out["pit"].append(dm["pit"])
        out["p_failed"].append(np.concatenate(pf))
        out["n_context"].append(np.array([len(c) for c in ctxs]))
        out["pmf"].append(np.concatenate(pmf))
        out["metrics"].append(dm)
    return out


def calibrate(data_dir, run_dir, *, max_queries: int = MAX_QUERIES, contexts=CONTEXTS,
              cold: bool = True, seed: int = 0, device: str = "cpu",
              progress: bool = True, geo_db=None) -> dict:
    """Fit and save the run's calibration on `data_dir`'s val splits; returns a summary.

    The val queries are asked about their known sources (train context, as `eval --splits
    val`). Unless cold=False, new sources -- where the model is most over-confident, and which
    a known-probe val alone would never show -- are asked twice more: val's sources re-addressed
    as if never seen (`queries.new_sources`, context from their train pings to other
    destinations, as `eval --splits val --readdress-sources`: many probes, random addresses),
    and the val_probe split's probes under their real addresses with their own earlier
    measurements as context (as `eval --splits val_probe`: few probes, real addresses), where
    the dataset has one. Each outcome counts for the population the engine will put its source
    in at query time (known = an address of the train split), so new sources get maps of their
    own, fitted on both kinds of newness.
    """
    from tqdm import tqdm

    from ping_llm.checkpoint import find_checkpoint, read_config, read_meta
    from ping_llm.data.prepare import load_card
    from ping_llm.data.schema import read_canonical
    from ping_llm.query.engine import Engine

    t0 = time.perf_counter()
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    card = load_card(data_dir)
    info = card["splits"].get(SPLIT) or {}
    if not info.get("measurements"):
        raise InputError(f"{data_dir} has no {SPLIT} split to calibrate on; prepare it with "
                         "--val-pair-fraction / --val-time-fraction above 0")
    cold_info = (card["splits"].get(COLD_SPLIT) or {}) if cold else {}
    train = read_canonical(data_dir / card["splits"]["train"]["parquet"])
    val = read_canonical(data_dir / info["parquet"])
    held = {SPLIT: val}
    if cold_info.get("measurements"):
        held[COLD_SPLIT] = read_canonical(data_dir / cold_info["parquet"])
    check_leak(card, read_config(run_dir), train, held)
    step = read_meta(find_checkpoint(run_dir))["step"]
    engine = Engine.load(run_dir, device=device, calibrated=False, byte2_mass=BYTE2_MASS,
                         geo_db=geo_db)
    train_sources, train_pairs = known_of(train)
    q = Queries.of(val, max_queries, seed, SPLIT)
    asked = {"known sources": Asked(SPLIT, q, ContextPool(train), None,
                                    populations(q.src, q.dst, train_sources, train_pairs))}
    if cold:
        asked["new sources"] = Asked(SPLIT, q, ContextPool(train, other_destinations=True),
                                     new_sources(q.src, seed, SPLIT), np.full(len(q), "new"))
    if COLD_SPLIT in held:
        qc = Queries.of(held[COLD_SPLIT], max_queries, seed, COLD_SPLIT)
        asked["new probes"] = Asked(COLD_SPLIT, qc,
                                    ContextPool(held[COLD_SPLIT], other_destinations=True), None,
                                    populations(qc.src, qc.dst, train_sources, train_pairs))
    n_cold = sum(len(a.queries) for a in asked.values() if a.split == COLD_SPLIT)
    budget = engine.config.sequence_len - 50  # as evaluate: room for the query and its result
    rng = np.random.default_rng([seed, 0xCA1])
    bar = tqdm(total=sum(len(a.queries) for a in asked.values()) * len(contexts),
               desc=f"calibrate on {', '.join(held)}", unit="q", file=sys.stderr,
               disable=not progress)
    got = {name: raw_distributions(engine, a.queries, a.pool, contexts, budget, rng, a.new_src,
                                   bar) for name, a in asked.items()}
    bar.close()
    cat = {key: np.concatenate([np.concatenate(g[key]) for g in got.values()])
           for key in ("pit", "p_failed", "n_context")}
    failed = np.concatenate([np.tile(a.queries.failed, len(contexts)) for a in asked.values()])
    pops = np.concatenate([np.tile(a.populations, len(contexts)) for a in asked.values()])
    cal = Calibration.fit(cat["pit"], cat["n_context"], cat["p_failed"], failed, pops,
                          known_sources=train_sources, known_pairs=train_pairs, fitted={
        "step": step, "data_dir": str(data_dir), "split": SPLIT,
        "split_fingerprint": info.get("fingerprint"), "queries": len(q),
        COLD_SPLIT: {"split_fingerprint": cold_info.get("fingerprint"), "queries": n_cold}
        if n_cold else None,
        "contexts": list(contexts), "populations": list(asked), "seed": seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    path = cal.save(run_dir)
    summary = {"file": str(path), "step": step, "queries": len(q),
               "val_probe_queries": n_cold, "contexts": list(contexts),
               "populations": list(asked), "replies": cal.fitted["replies"],
               "known_sources": len(cal.known_sources), "known_pairs": len(train_pairs),
               "platt": cal.platt, "val": {},
               "split_of": {name: a.split for name, a in asked.items()}}
    for name, g in got.items():
        a = asked[name]
        rows = summary["val"][name] = {}
        for j, k in enumerate(contexts):
            after = np.stack([cal.probs(row, n, p) for row, n, p in zip(
                g["pmf"][j], g["n_context"][j], a.populations, strict=True)])
            rows[f"k={k}"] = {"before": _coverage(g["metrics"][j]), "after": _coverage(
                distribution_metrics(GRID, after, a.queries.obs, rng))}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary
