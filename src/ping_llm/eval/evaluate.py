"""The leak-free evaluation harness: a trained run against the classic baselines.

`evaluate(data_dir, run_dir, out_dir)` scores a checkpoint on the test splits of the prepared
dataset it was trained on (or on external canonical Parquet, `test_paths`) and writes the report
(`ping_llm.eval.report`). What happens, in order:

1. Leak check (`ping_llm.eval.leakcheck.check_leak`): the run must have been trained on this
   dataset's train split (recorded fingerprint), no evaluated measurement may be in it, and the
   split invariants (no test_probe or val_probe probe, no test_pair (probe, dst) in train) hold
   on the data.
2. Queries. Each split is subsampled uniformly without replacement to `max_queries` rows with
   numpy default_rng([seed, crc32(split name)]) (kept in row order); failed pings stay in (they
   score P(failed)). RTT metrics use the successful rows.
3. Context. For k in `contexts`, the k most recent measurements of the query's source strictly
   before the query time, time-ordered, from train. test_probe and val_probe probes have no train
   measurements by construction (cold start), so their context is their own earlier measurements in
   that split to *other* destinations (what a new node knows about itself; never the query, never
   the pair's own history, never anything the model trained on); `context_from="test"` does the same
   for test_time / test_pair / an external set (a new campaign whose sources the model has not
   seen). Fewer than k are used when fewer exist; contexts that would not fit the model's window are
   cut to the most recent that fit. The mean context size actually used is recorded per k. The
   baselines that can read a context (`predict_in_context`: Vivaldi updates of the new node, MF
   fold-in, source offset, the context's own median, geo + residual, per-source failure rate) get
   exactly the same k measurements for cold-context sets, reported as "<baseline> k=K".
4. Model. Per query, the engine's exact RTT distribution (`query.Engine.rtt_many`, with the query
   timestamp) gives P(failed) and the pmf over the 33,792 canonical RTT codes given a reply; the
   median is the point prediction. A teacher-forced forward over context + query (fields in the
   query order src, dst, time, result) gives the token NLL per field and per token position, and
   log P(observed result) (role constrained to {RTT_START, FAILED}, byte1 to canonical values,
   as the engine does), with and without the query's timestamp (the timestamp ablation).
   The engine runs with `byte2_mass` 0.999 (its default is 0.9999): the byte1 bins holding
   99.9% of the mass are refined to byte2, the rest (< 0.1%) sits at bin centres. On CPU this
   halves the cost of k = 16 contexts (every refined bin copies the context's KV cache), and it
   moves at most 0.1% of the mass by at most half a bin (~10% of the RTT).
5. Baselines (`baselines.make_baselines()`), fitted on exactly the train split, predict medians,
   quantiles and P(failed) where they have them; each is reported on the rows it covers and on
   all rows with the global-median fallback (global quantiles / failure rate likewise).
6. Synthetic data: when the dataset came from `ping-llm synth` (card inputs -> ingest's Parquet
   metadata -> the JSON file -> FILE.world.json) or `world` is given, the generator's truth gives
   KL(true || model) per query and a "truth" row (the best any method can do).

Metrics and how per-query predictions become the report's numbers: `ping_llm.eval.scoring`.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ping_llm import tokens as tk
from ping_llm.data.observations import SourceContext
from ping_llm.data.splits import COLD_SPLITS
from ping_llm.errors import InputError
from ping_llm.eval.config import EvalConfig
from ping_llm.eval.leakcheck import check_leak
from ping_llm.eval.queries import (
    ContextPool,
    Queries,
    new_sources,
    real_knowledge,
    with_source,
)
from ping_llm.eval.results import EvalResults, RunInfo, SetPlot, SetResult, Settings
from ping_llm.eval.scoring import (
    BASELINE_LADDER,
    BLOCK,
    CENSOR_MS,
    DIST_KEYS,
    GRID,
    LEVELS,
    PIT_BINS,
    baseline_predictions,
    baseline_summary,
    breakdowns,
    context_baseline_predictions,
    dense_pmf,
    distribution_metrics,
    finite_mean,
    finite_median,
    fit_baselines,
    kl_to_truth,
    nll_summary,
    summarize,
    truth_pass,
    truth_pdf,
)

PAIR_SEEN = ((0, 0, "0"), (1, 9, "1-9"), (10, 99, "10-99"), (100, None, "100+"))
SOURCE_SEEN = ((0, 0, "0"), (1, 99, "1-99"), (100, 999, "100-999"), (1000, None, "1000+"))


# ----------------------------------------------------------------------------------------------
# inputs and the leak check


def find_world_file(card: dict, data_dir) -> Path | None:
    """The synthetic world behind a dataset: card inputs -> ingest metadata -> FILE.world.json."""
    import pyarrow.parquet as pq

    from ping_llm.data.synth import world_path

    for inp in card.get("inputs", []):
        p = Path(inp)
        cands = [p, Path(data_dir) / p]
        p = next((c for c in cands if c.is_file()), None)
        if p is None:
            continue
        try:
            meta = pq.read_metadata(p).metadata or {}
            src = json.loads(meta.get(b"ping_llm.ingest", b"{}")).get("input")
        except (OSError, ValueError, pa.ArrowInvalid):
            continue
        if not src or src == "-":
            continue
        for base in (Path(src), p.parent / Path(src).name, p.parent.parent / Path(src).name):
            w = world_path(base)
            if w.is_file():
                return w
    return None


# ----------------------------------------------------------------------------------------------
# aggregation


def _bins(counts: np.ndarray, spec) -> np.ndarray:
    labels = np.empty(len(counts), dtype=object)
    for lo, hi, name in spec:
        labels[(counts >= lo) & ((counts <= hi) if hi is not None else True)] = name
    return labels


# ----------------------------------------------------------------------------------------------
# one evaluated set


def _model_pass(engine, q: Queries, ctxs: list, truth, tix, rng, bar=None) -> dict:
    """Per-query model results for one context setting (arrays of length N)."""
    from ping_llm.query.generate import teacher_forced
    from ping_llm.query.targets import Query

    n = len(q)
    seqs, starts, seqs_nt = [], [], []
    for i in range(n):
        ctx = list(ctxs[i])
        starts.append(len(tk.encode_reference(ctx)))
        seqs.append(tk.encode_reference(ctx + [q.measurement(i)]))
        seqs_nt.append(tk.encode_reference(ctx + [q.measurement(i, with_time=False)]))
    sc = teacher_forced(engine.runner, seqs, starts)
    sc_nt = teacher_forced(engine.runner, seqs_nt, starts)
    out = {k: np.full(n, np.nan) for k in ("median", "p_failed", "kl_rtt", "kl_byte1", "kl_full")
           + DIST_KEYS}
    out["logp"] = np.array([s["result"] for s in sc])
    out["logp_no_time"] = np.array([s["result"] for s in sc_nt])
    out["scores"], out["scores_no_time"] = sc, sc_nt
    for s in range(0, n, BLOCK):
        rows = np.arange(s, min(n, s + BLOCK))
        qs = [Query(str(q.src[i]), str(q.dst[i]), int(q.time[i]), context=list(ctxs[i]))
              for i in rows]
        pf, pmf = dense_pmf(engine.rtt_many(qs))
        dm = distribution_metrics(GRID, pmf, q.obs[rows], rng)
        out["median"][rows] = dm["q"][:, 2]
        for k in DIST_KEYS:
            out[k][rows] = dm[k]
        out["p_failed"][rows] = pf
        has = tix[rows] >= 0
        if truth is not None and has.any():
            tpf, tpdf = truth_pdf(truth, tix[rows][has])
            for k, v in kl_to_truth(tpf, tpdf, pf[has], pmf[has]).items():
                out[k][rows[has]] = v
        if bar is not None:
            bar.update(len(rows))
    return out


def _seen_fractions(table: pa.Table, train: pa.Table) -> dict:
    """How much of an external set's sources, destinations and pairs occur in train (distinct
    values and measurement-weighted)."""
    def pairs(t):
        return pc.binary_join_element_wise(t["src_addr"], t["dst_addr"], "|")

    out = {}
    for name, col, ref in (("sources", table["src_addr"], train["src_addr"]),
                           ("destinations", table["dst_addr"], train["dst_addr"]),
                           ("pairs", pairs(table), pairs(train))):
        ref_u = pc.unique(ref)
        seen = pc.is_in(col, value_set=ref_u).to_numpy(zero_copy_only=False)
        uniq = pc.unique(col)
        seen_u = pc.is_in(uniq, value_set=ref_u).to_numpy(zero_copy_only=False)
        out[name] = {"distinct": len(uniq), "distinct_seen": int(seen_u.sum()),
                     "distinct_seen_frac": float(seen_u.mean()) if len(uniq) else float("nan"),
                     "measurements_seen_frac": float(seen.mean()) if len(seen) else float("nan")}
    return out


def _examples(engine, name, table, q_all: Queries, pool, truth_world, kmax, budget,
              n_examples: int) -> list:
    """A few pairs with many measurements in the set: the model's byte1 histogram averaged over
    (up to) 16 of the pair's measurement times, k = 0 and k = kmax, against the observed RTTs and
    (synthetic data) the truth averaged over the same times."""
    from ping_llm.query.targets import Query

    if n_examples <= 0 or len(q_all) == 0:
        return []
    key = np.char.add(np.char.add(q_all.src.astype(str), "|"), q_all.dst.astype(str))
    ok = ~q_all.failed
    keys, counts = np.unique(key[ok], return_counts=True)
    out, used = [], set()
    for kk in keys[np.argsort(-counts, kind="stable")]:
        if len(out) >= n_examples:
            break
        rows = np.flatnonzero(key == kk)
        s, d = str(q_all.src[rows[0]]), str(q_all.dst[rows[0]])
        if s in used or d in used or (~q_all.failed[rows]).sum() < 10:
            continue
        used |= {s, d}
        pick = rows[np.unique(np.linspace(0, len(rows) - 1, 16).round().astype(int))]
        ex = {"src": s, "dst": d, "n": int(len(rows)), "rtt": q_all.rtt[rows][ok[rows]].tolist(),
              "failed_frac": float(q_all.failed[rows].mean()), "model": {}, "truth": None}
        lo, p = pool.before(q_all.src[pick], q_all.time[pick])
        for k in sorted({0, kmax}):
            qs = [Query(s, d, int(q_all.time[i]), context=pool.context(lo[j], p[j], k, budget, d))
                  for j, i in enumerate(pick)]
            pf, pmf = dense_pmf(engine.rtt_many(qs))
            p_b1 = pmf.reshape(len(pmf), -1, 256).sum(2).mean(0)
            ex["model"][str(k)] = {"p_byte1": p_b1.tolist(), "p_failed": float(pf.mean())}
        if truth_world is not None:
            try:
                tr = truth_world.truth(q_all.src[pick].astype(str), q_all.dst[pick].astype(str),
                                       q_all.time[pick].astype(float))
                ex["truth"] = {"p_byte1": tr.pdf_byte1()[:, tk.CANON_B1].mean(0).tolist(),
                               "p_failed": float(tr.p_fail.mean())}
            except InputError:
                pass
        out.append(ex)
    return out




def _in_world(world, src, dst) -> np.ndarray:
    from ping_llm.data.synth import ANYCAST

    idx = world.index
    out = np.zeros(len(src), bool)
    for i, (s, d) in enumerate(zip(src, dst, strict=True)):
        out[i] = s in idx and d in idx and world.kind[idx[s] // 2] != ANYCAST
    return out


def _eval_set(name, table, *, engine, fitted, train_counts, pool, contexts, max_queries, seed,
              world, n_examples, progress, readdress=False) -> SetResult:
    """Everything for one evaluated set (its numbers and its plot data). readdress: the sources get
    new addresses in the queries and their contexts (`new_sources`), after the context and the
    ground truth are looked up under the real ones."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    q = Queries.of(table, max_queries, seed, name)
    obs, failed = q.obs, q.failed
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 1])
    plot = SetPlot(obs, failed)
    res = SetResult(
        n_total=table.num_rows, n_evaluated=len(q),
        subsample={"seed": seed, "max_queries": max_queries,
                   "method": "uniform without replacement, numpy default_rng([seed, "
                   "crc32(name)]), kept in row order"},
        n_success=int((~failed).sum()), n_failed=int(failed.sum()),
        ip_versions={str(v): int((q.version == v).sum()) for v in (4, 6)}, plot=plot)

    truth, tix = None, np.full(len(q), -1)
    if world is not None:
        has = _in_world(world, q.src, q.dst)
        res.truth_rows = int(has.sum())
        if has.any():
            truth = world.truth(q.src[has].astype(str), q.dst[has].astype(str),
                                q.time[has].astype(float))
            tix[has] = np.arange(int(has.sum()))

    budget = engine.config.sequence_len - 50  # room for the query (<= 47 tokens) + RTT bytes
    lo, p = pool.before(q.src, q.time)
    real_src = q.src
    if readdress:
        q = Queries(new_sources(q.src, seed, name), q.dst, q.rtt, q.time, q.version)
    bar = tqdm(total=len(q) * len(contexts), desc=f"eval {name}", unit="q", file=sys.stderr,
               disable=not progress)
    per_method, prev, contexts_by_k = {}, None, {}
    ok = ~failed
    for k in contexts:
        ctxs = [pool.context(lo[i], p[i], k, budget, str(q.dst[i])) for i in range(len(q))]
        if readdress:  # the context is the same source's: it gets the same new address
            ctxs = [with_source(c, str(q.src[i])) for i, c in enumerate(ctxs)]
        contexts_by_k[k] = ctxs
        n_ctx = np.array([len(c) for c in ctxs])
        t1 = time.perf_counter()
        if prev is not None and np.array_equal(n_ctx, prev[0]):
            out = prev[1]  # no query has more context than at the previous k: same answers
            bar.update(len(q))
        else:
            with real_knowledge(engine, q.src, real_src):  # nothing unless re-addressed
                out = _model_pass(engine, q, ctxs, truth, tix, rng, bar)
        prev = (n_ctx, out)
        label = f"model k={k}"
        s = summarize(obs, failed, out)
        s.update(kind="model", context=k, context_mean=float(n_ctx.mean()) if len(q) else 0.0,
                 context_full_frac=float((n_ctx >= k).mean()) if len(q) else 0.0,
                 seconds=round(time.perf_counter() - t1, 2))
        s["nll"] = nll_summary(out["scores"])
        s["nll_no_time"] = nll_summary(out["scores_no_time"])
        s["timestamp_ablation"] = {
            "logp_result_with_time": finite_mean(out["logp"]),
            "logp_result_without_time": finite_mean(out["logp_no_time"]),
            "logp_rtt_with_time": finite_mean(out["logp"][ok]),
            "logp_rtt_without_time": finite_mean(out["logp_no_time"][ok]),
            "gain_nats": finite_mean(out["logp"] - out["logp_no_time"])}
        if truth is not None:
            s["kl"] = {kind: {"mean": finite_mean(out[kind]), "median": finite_median(out[kind])}
                       for kind in ("kl_rtt", "kl_byte1", "kl_full")}
        res.methods[label] = s
        per_method[label] = out
        plot.methods[label] = {x: out[x] for x in ("median", "p_failed", "pit", "kl_rtt")}
    bar.close()

    if truth is not None:
        tr = truth_pass(truth, tix, q, rng)
        s = summarize(obs, failed, tr, tix >= 0)
        s.update(kind="truth", coverage=float((tix >= 0).mean()))
        res.methods["truth"] = s
        per_method["truth"] = tr
        plot.methods["truth"] = {x: tr[x] for x in ("median", "p_failed", "pit")}

    t1 = time.perf_counter()
    bp = baseline_predictions(fitted, q.src.astype(str), q.dst.astype(str), obs, failed)
    if pool.other_destinations:  # a cold context: the baselines that can read it get the same k
        for k, ctxs in contexts_by_k.items():
            if k == 0:
                continue
            sc = [SourceContext([m.dst for m in c], [m.rtt_ms for m in c]) for c in ctxs]
            for bname, row in context_baseline_predictions(
                    fitted, q.src.astype(str), q.dst.astype(str), sc, obs, failed, bp).items():
                bp[f"{bname} k={k}"] = row
    for bname, row in bp.items():
        if getattr(fitted.get(bname), "context_only", False):
            continue  # only its "k=K" rows: without a context it is the global median
        res.methods[bname] = baseline_summary(row, obs, failed)
        in_context = " k=" in bname
        if in_context:
            res.methods[bname]["context"] = int(bname.rsplit("=", 1)[1])
        rtt_free = row.get("p_failed_only", False)  # its medians are the global median's
        if not (in_context or rtt_free):  # the breakdowns compare the plain methods
            per_method[bname] = row
        plot.methods[bname] = {
            "median": np.full(len(q), np.nan) if rtt_free else row["median"],
            "p_failed": row.get("p_failed"), "covered": row["covered"], "context": in_context}
    res.baseline_predict_seconds = round(time.perf_counter() - t1, 2)

    pair_counts, src_counts = train_counts
    pair_n = np.array([pair_counts.get((s_, d_), 0) for s_, d_ in zip(q.src, q.dst, strict=True)])
    src_n = np.array([src_counts.get(s_, 0) for s_ in q.src])
    groups = {"ip_version": np.array([f"IPv{v}" for v in q.version], dtype=object),
              "pair_seen_in_train": _bins(pair_n, PAIR_SEEN),
              "source_seen_in_train": _bins(src_n, SOURCE_SEEN)}
    res.breakdowns = breakdowns(groups, obs, failed, per_method)
    q_all = Queries.of(table)
    plot.examples = _examples(engine, name, table, q_all, pool, world, max(contexts), budget,
                              n_examples)
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


# ----------------------------------------------------------------------------------------------
# the entry point


def _train_counts(train: pa.Table) -> tuple[dict, dict]:
    g = train.group_by(["src_addr", "dst_addr"]).aggregate([("rtt", "count")])
    pairs = dict(zip(zip(g["src_addr"].to_pylist(), g["dst_addr"].to_pylist(), strict=True),
                     g["rtt_count"].to_pylist(), strict=True))
    s = train.group_by(["src_addr"]).aggregate([("rtt", "count")])
    return pairs, dict(zip(s["src_addr"].to_pylist(), s["rtt_count"].to_pylist(), strict=True))


def evaluate(data_dir, run_dir, out_dir=None, config: EvalConfig | None = None, *,
             test_paths=None, test_since: int | None = None, test_until: int | None = None,
             **options) -> EvalResults:
    """Evaluate the run in `run_dir` on the dataset in `data_dir` (its test splits, or the canonical
    Parquet `test_paths` instead) and, with `out_dir`, write the report there
    (`report.write_report`). The settings are an `eval.config.EvalConfig`, or its fields as keyword
    arguments (`options`): world, a synthetic world (synth.World or its .world.json path), found
    from the dataset's provenance when None; context_from, where a query's k context measurements
    come from for test_time / test_pair / an external set: "train" (the source's most recent train
    measurements before the query) or "test" (its own earlier measurements in the evaluated set, to
    other destinations: a new campaign whose sources are unknown); test_probe and val_probe always
    use their own. geo_db: the MaxMind database of the geolocation baseline (default: a synthetic
    world's own, else the packaged GeoLite2-City) and of a run that reads address knowledge
    (default: the one the run recorded). splits: the dataset's splits to score; ("val",) and
    ("val_probe",) are how defaults are chosen without looking at the test splits. calibrated: apply
    the run's calibration.json (if it has one) to the model's distributions, as queries do.
    readdress: every evaluated source gets a new random address in its queries and contexts, and its
    context skips the query's destination, so known probes are asked about as if never seen (cold
    start on `val`, where choosing is allowed; the baselines see the same addresses).
    test_since / test_until (epoch s): keep only that time window of the external set (the
    drift protocol).
    Returns the `eval.results.EvalResults` (`to_dict()`: every number, as metrics.json)."""
    from ping_llm import __version__
    from ping_llm.checkpoint import find_checkpoint, read_config, read_meta
    from ping_llm.data.prepare import load_card
    from ping_llm.data.schema import read_canonical
    from ping_llm.data.synth import World, geo_db_path
    from ping_llm.query.engine import Engine
    from ping_llm.query.targets import parse_time

    t_start = time.perf_counter()
    if config is None:
        try:
            config = EvalConfig(**options)
        except TypeError as e:  # an unknown keyword: name it in one line
            raise InputError(f"evaluate: {e}") from None
    elif options:
        raise InputError("evaluate: give a config or its fields, not both")
    c = config
    max_queries, contexts, seed, device, world = (c.max_queries, c.contexts, c.seed, c.device,
                                                  c.world)
    context_from, splits, readdress, progress = c.context_from, c.splits, c.readdress, c.progress
    geo_db, byte2_mass = c.geo_db, c.byte2_mass
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    card = load_card(data_dir)
    run_config = read_config(run_dir)
    meta = read_meta(find_checkpoint(run_dir))
    timings = {}
    t0 = time.perf_counter()
    train = read_canonical(data_dir / card["splits"]["train"]["parquet"])
    external = test_paths is not None
    if external:
        paths = [test_paths] if isinstance(test_paths, str | Path) else list(test_paths)
        if not paths:
            raise InputError("test_paths is empty")
        ext = read_canonical(paths)
        window = test_since is not None or test_until is not None
        if window and ext.num_rows:
            t = ext["event_time"].cast(pa.int64()).to_numpy()
            lo = t.min() if test_since is None else parse_time(test_since)
            hi = t.max() + 1 if test_until is None else parse_time(test_until)
            ext = ext.filter(pa.array((t >= lo) & (t < hi)))
        sets = {"external": ext}
        if ext.num_rows == 0:
            raise InputError(f"no measurements in {[str(p) for p in paths]}"
                             + (" inside --since/--until" if window else ""))
    else:
        if test_since is not None or test_until is not None:
            raise InputError("test_since / test_until select a window of an external set "
                             "(test_paths); give test_paths")
        sets = {s: read_canonical(data_dir / card["splits"][s]["parquet"]) for s in splits
                if card["splits"].get(s, {}).get("measurements")}
        if not sets:
            raise InputError(f"{data_dir} has no non-empty split among {list(splits)}")
    timings["read_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    leak = check_leak(card, run_config, train, sets, external=external,
                      allow_foreign_run=c.allow_foreign_run)
    timings["leak_check_s"] = round(time.perf_counter() - t0, 2)

    world_file, world_note = None, None
    if world is None:
        world_file = find_world_file(card, data_dir)
        if world_file is not None:
            try:
                world = World.load(world_file)
            except InputError as e:  # found by provenance, not asked for: report, do not fail
                world_note, world_file = f"no KL: {e}", None
    elif not isinstance(world, World):
        world_file = Path(world)
        world = World.load(world_file)

    baseline_db = geo_db
    if geo_db is None and world_file is not None and geo_db_path(world_file).is_file():
        baseline_db = geo_db_path(world_file)  # a synthetic world publishes its own geolocation
    t0 = time.perf_counter()
    fitted, fit_secs = fit_baselines(train, progress, baseline_db)
    timings["baselines_fit_s"] = round(time.perf_counter() - t0, 2)
    engine = Engine.load(run_dir, device=device, byte2_mass=byte2_mass, calibrated=c.calibrated,
                         geo_db=geo_db)
    counts = _train_counts(train)
    train_pool = ContextPool(train)
    cold_train_pool = ContextPool(train, other_destinations=True) if readdress else None

    results = EvalResults(
        ping_llm=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        data_dir=str(data_dir), run_dir=str(run_dir),
        dataset={"fingerprints": {s: v.get("fingerprint") for s, v in card["splits"].items()},
                 "measurements": {s: v.get("measurements") for s, v in card["splits"].items()},
                 "counts": card.get("counts"), "time_range": card.get("time_range"),
                 "inputs": card.get("inputs")},
        run=RunInfo(step=meta.get("step"), model=run_config.get("model"),
                    preset=(run_config.get("train") or {}).get("preset"),
                    trainer=meta.get("trainer"),
                    calibration=None if engine.calibration is None else engine.calibration.fitted,
                    knowledge=run_config.get("knowledge")),
        settings=Settings(max_queries=max_queries, contexts=list(contexts), seed=seed,
                          context_from=context_from, splits=list(sets), readdress=readdress,
                          device=str(device), levels=list(LEVELS), pit_bins=PIT_BINS,
                          byte2_mass=byte2_mass, censor_ms=CENSOR_MS,
                          baseline_crps_levels=len(BASELINE_LADDER),
                          test_paths=[str(p) for p in paths] if external else None,
                          test_window=[test_since, test_until] if external else None),
        leak_check=leak,
        synthetic=None if world is None else {
            "world_file": None if world_file is None else str(world_file),
            "fingerprint": world.fingerprint()},
        synthetic_note=world_note,
        baselines={"fit_seconds": fit_secs, "train_measurements": train.num_rows,
                   "geo_db": fitted["geo"].db.describe()},
    )
    for name, table in sets.items():
        if external:
            results.external = {"seen_in_train": _seen_fractions(table, train)}
        own = name in COLD_SPLITS or context_from == "test"
        pool = (ContextPool(table, other_destinations=True) if own else
                cold_train_pool if readdress else train_pool)
        res = _eval_set(name, table, engine=engine, fitted=fitted, train_counts=counts,
                        pool=pool, contexts=contexts, max_queries=max_queries, seed=seed,
                        world=world, n_examples=c.n_examples, progress=progress,
                        readdress=readdress)
        res.context_pool = (f"own earlier {name} measurements to other destinations"
                            if own else "train, other destinations" if readdress else "train")
        res.readdressed_sources = readdress
        results.splits[name] = res
        timings[f"{name}_s"] = res.seconds
    if not readdress:  # the run's kept checkpoints on the same sets (k = 0, raw)
        from ping_llm.eval.curve import CURVE_QUERIES, learning_curve

        t0 = time.perf_counter()
        curve_sets = {n: Queries.of(t, CURVE_QUERIES, seed, n) for n, t in sets.items()}
        results.learning_curve = learning_curve(run_dir, curve_sets, GRID, device, seed=seed,
                                                geo_db=geo_db)
        timings["learning_curve_s"] = round(time.perf_counter() - t0, 2)
    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    results.timings = timings
    if out_dir is not None:
        from ping_llm.eval.report import write_report

        results.files = write_report(results, out_dir)
    return results
