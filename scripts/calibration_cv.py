"""Calibration variants judged on val alone: fit on half of val's (source, destination) pairs,
score on the other half, and the reverse. No test split is read.

    python scripts/calibration_cv.py --data menog/data --run menog/run [--cache val.npz]

The raw model is asked val's queries once, as `ping-llm calibrate` asks them (every k of
`queries.CONTEXTS`, as they are and re-addressed; calibrate also asks val_probe, which has no
pairs to cross-fit on and is left out here); --cache keeps those answers for a rerun.
Variants: raw; two populations (new pairs take the known maps, as before calibration told pairs
apart); three populations with every map free; three with the new-pair maps symmetric about the
median (fitted on the PITs and their mirror 1 - u, so R(1/2) = 1/2 and the median stays the
model's: the default, `calibration.SYMMETRIC`); three with every map symmetric; the default
fitted separately per tercile of the raw forecast's spread (log q95/q05, edges from the fitting
half), so sharp forecasts get maps of their own. Prints, per population, 50%/90% coverage,
median abs error of the median and CRPS<=10s (ms), k pooled.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ping_llm.data.prepare import load_card
from ping_llm.data.schema import read_canonical
from ping_llm.eval import metrics as M
from ping_llm.eval.calibrate import known_of, populations, raw_distributions
from ping_llm.eval.config import BYTE2_MASS
from ping_llm.eval.queries import CONTEXTS, MAX_QUERIES, ContextPool, Queries, new_sources
from ping_llm.eval.scoring import GRID, distribution_metrics
from ping_llm.query.calibration import POPULATIONS, Calibration, pair_keys
from ping_llm.query.engine import Engine

# variant -> the populations with symmetric maps (None: no calibration)
VARIANTS = {"raw": None, "two populations": set(), "three, every map free": set(),
            "three, new-pair maps symmetric": {"new_pair"},
            "three, every map symmetric": set(POPULATIONS),
            "default, per spread tercile": {"new_pair"}}
SPREAD_BINS = {"default, per spread tercile": 3}


def ask(data: Path, run: Path, q, train) -> dict:
    eng = Engine.load(run, calibrated=False, byte2_mass=BYTE2_MASS)
    budget = eng.config.sequence_len - 50
    rng = np.random.default_rng([0, 0xCA1])
    bar = tqdm(total=len(q) * len(CONTEXTS) * 2, desc="val", unit="q")
    a = raw_distributions(eng, q, ContextPool(train), CONTEXTS, budget, rng, None, bar)
    b = raw_distributions(eng, q, ContextPool(train, other_destinations=True), CONTEXTS, budget,
                          rng, new_sources(q.src, 0, "val"), bar)
    bar.close()
    return {f"{n}_{k}": np.stack(g[k]) for n, g in (("as", a), ("re", b))
            for k in ("pit", "p_failed", "n_context", "pmf")}


def fit(variant, pit, nctx, pf, failed, pop) -> Calibration:
    if variant == "two populations":
        pop = np.where(pop == "new_pair", "known", pop)
    cal = Calibration.fit(pit, nctx, pf, failed, pop, symmetric=VARIANTS[variant])
    if variant == "two populations":
        cal.maps["new_pair"], cal.platt["new_pair"] = cal.maps["known"], cal.platt["known"]
    return cal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--cache", type=Path, help="an .npz of the raw answers (made if missing)")
    args = ap.parse_args()
    card = load_card(args.data)
    train = read_canonical(args.data / card["splits"]["train"]["parquet"])
    val = read_canonical(args.data / card["splits"]["val"]["parquet"])
    q = Queries.of(val, MAX_QUERIES, 0, "val")
    if args.cache is not None and args.cache.exists():
        z = dict(np.load(args.cache))
    else:
        z = ask(args.data, args.run, q, train)
        if args.cache is not None:
            np.savez(args.cache, **z)
    K = len(CONTEXTS)
    as_is = populations(q.src, q.dst, *known_of(train))
    # (2K, N): the val queries as they are, then re-addressed, at every k
    pit, nctx = np.r_[z["as_pit"], z["re_pit"]], np.r_[z["as_n_context"], z["re_n_context"]]
    pf, pmf = np.r_[z["as_p_failed"], z["re_p_failed"]], np.r_[z["as_pmf"], z["re_pmf"]]
    failed = np.tile(q.failed, (2 * K, 1))
    pop = np.stack([as_is] * K + [np.full(len(q), "new")] * K)
    half = np.tile((pair_keys(q.src, q.dst) % np.uint64(2)).astype(int), (2 * K, 1))
    q05, q95 = M.quantiles_from_pmf(GRID, pmf.reshape(-1, pmf.shape[-1]), [0.05, 0.95]).T
    spread = (np.log(np.maximum(q95, 1e-3)) - np.log(np.maximum(q05, 1e-3))).reshape(pit.shape)
    rng = np.random.default_rng(1)
    for variant in VARIANTS:
        got = {p: [] for p in POPULATIONS}
        n_bins = SPREAD_BINS.get(variant, 1)
        for h in (0, 1):
            fitted = half != h
            levels = np.linspace(0, 1, n_bins + 1)[1:-1]
            edges = np.quantile(spread[fitted & np.isfinite(pit)], levels)
            sbin = np.searchsorted(edges, spread)  # (2K, N) the spread bin of every row
            cals = [None if VARIANTS[variant] is None else fit(
                variant, *(x[fitted & (sbin == b)] for x in (pit, nctx, pf, failed, pop)))
                for b in range(n_bins)]
            for r in range(2 * K):
                test = np.flatnonzero(half[r] == h)
                P = pmf[r, test]
                if cals[0] is not None:
                    P = np.stack([cals[sbin[r, t]].probs(P[i], int(nctx[r, t]), pop[r, t])
                                  for i, t in enumerate(test)])
                dm = distribution_metrics(GRID, P, q.obs[test], rng)
                for i, t in enumerate(test):
                    got[pop[r, t]].append((dm["in50"][i], dm["in90"][i],
                                           abs(dm["q"][i, 2] - q.obs[t]), dm["crps_cens"][i]))
        print(variant)
        for p, rows in got.items():
            a = np.array(rows, float).reshape(-1, 4)
            a = a[np.isfinite(a[:, 0])]
            print(f"  {p:<9} replies {len(a):>5}  cov50 {a[:, 0].mean():.2f}  cov90 "
                  f"{a[:, 1].mean():.2f}  median AE {np.median(a[:, 2]):6.2f}  CRPS "
                  f"{a[:, 3].mean():6.2f}")


if __name__ == "__main__":
    main()
