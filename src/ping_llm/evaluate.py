"""The leak-free evaluation harness (SPEC §7, issue 7): a trained run against the classic baselines.

`evaluate(data_dir, run_dir, out_dir)` scores a checkpoint on the test splits of the prepared
dataset it was trained on (or on external canonical Parquet, `test_paths`) and writes the report
(`ping_llm.report`). What happens, in order:

1. Leak check (`check_leak`). The run must record the fingerprint of its train split (prepare's
   sha256 over the split's content); it must equal this dataset card's train fingerprint, and may
   not equal any test split's. The splits' content is then checked for exact shared measurements
   (event_time, src, dst, rtt) against train (prepare guarantees none; external sets may have
   some: refused). `allow_foreign_run` accepts a run trained on another dataset only if that
   dataset is still on disk with the recorded fingerprint and none of its train measurements is
   in the evaluated sets (checked on content). Any failure raises InputError (CLI exit 2).
2. Queries. Each split is subsampled uniformly without replacement to `max_queries` rows with
   numpy default_rng([seed, crc32(split name)]) (kept in row order); failed pings stay in (they
   score P(failed)). RTT metrics use the successful rows.
3. Context. For k in `contexts`, the k most recent measurements of the query's source strictly
   before the query time, time-ordered, from train. test_probe sources have no train
   measurements by construction (cold start), so their context is their own earlier test_probe
   measurements (never the query, never anything the model trained on). Fewer than k are used
   when fewer exist; contexts that would not fit the model's window are cut to the most recent
   that fit. The mean context size actually used is recorded per k.
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

import json
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ping_llm import metrics as M
from ping_llm import tokens as tk
from ping_llm.errors import InputError

EVAL_SPLITS = ("test_time", "test_pair", "test_probe")
CONTEXTS = (0, 1, 4, 16)
MAX_QUERIES = 500
BYTE2_MASS = 1.0 - 1e-3  # engine refinement: bins holding 99.9% of the mass get byte2 (see doc)
CENSOR_MS = 10_000.0  # censored CRPS: forecasts and observations are min(x, 10 s)
LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)  # median and the central 50% / 90% intervals
BASELINE_LADDER = tuple((np.arange(40) + 0.5) / 40)  # quantile levels for baselines' CRPS
PIT_BINS = 10
PAIR_SEEN = ((0, 0, "0"), (1, 9, "1-9"), (10, 99, "10-99"), (100, None, "100+"))
SOURCE_SEEN = ((0, 0, "0"), (1, 99, "1-99"), (100, 999, "100-999"), (1000, None, "1000+"))
BLOCK = 64  # queries per dense (BLOCK, 33792) pmf block
SCORE_BATCH_TOKENS = 16384  # tokens per teacher-forced scoring forward
_KEYS = ("event_time", "src_addr", "dst_addr", "rtt")

CANON = np.flatnonzero(np.isfinite(tk.RTT_GRID_MS))  # the 132 x 256 canonical codes, ascending
GRID = tk.RTT_GRID_MS[CANON]  # their RTTs in ms, ascending


# ----------------------------------------------------------------------------------------------
# inputs and the leak check


def _table_arrays(table: pa.Table) -> dict:
    t = table.column("event_time").cast(pa.int64()).to_numpy()
    return dict(src=np.asarray(table.column("src_addr").to_pylist(), dtype=object),
                dst=np.asarray(table.column("dst_addr").to_pylist(), dtype=object),
                rtt=table.column("rtt").to_numpy(), time=t,
                version=table.column("ip_version").to_numpy().astype(np.int64))


def recorded_train_fingerprint(run_config: dict) -> str | None:
    """The train-split fingerprint a run recorded: a `train_fingerprint` key anywhere in its
    config, or `fingerprint` under a `train` entry of a recorded card's `splits`."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                in_card = key == "fingerprint" and path[-2:] == ("splits", "train")
                if isinstance(value, str) and (key == "train_fingerprint" or in_card):
                    found.append(value)
                else:
                    walk(value, path + (key,))

    walk(run_config, ())
    if len(set(found)) > 1:
        raise InputError(f"the run records several train fingerprints {sorted(set(found))}")
    return found[0] if found else None


def content_overlap(a: pa.Table, b: pa.Table) -> int:
    """Rows of `a` whose (event_time, src, dst, rtt) also occurs in `b` (exact match)."""
    if a.num_rows == 0 or b.num_rows == 0:
        return 0
    left = a.select(list(_KEYS)).append_column("_n", pa.array(np.ones(a.num_rows, np.int8)))
    right = b.select(list(_KEYS)).group_by(list(_KEYS)).aggregate([])
    return left.join(right, list(_KEYS), join_type="inner").num_rows


def check_leak(card: dict, run_config: dict, train: pa.Table, test_sets: dict, *,
               external: bool = False, allow_foreign_run: bool = False) -> dict:
    """Refuse (InputError) a run whose training data may overlap the evaluated sets; returns
    what was checked. See the module docstring for the rules."""
    card_fp = card["splits"]["train"]["fingerprint"]
    run_fp = recorded_train_fingerprint(run_config)
    test_fps = {s: card["splits"][s]["fingerprint"] for s in EVAL_SPLITS
                if card["splits"].get(s, {}).get("measurements")}
    info = {"dataset_train_fingerprint": card_fp, "run_train_fingerprint": run_fp,
            "test_fingerprints": test_fps, "mode": "fingerprint", "overlap": {}}
    hit = [s for s, fp in test_fps.items() if fp == run_fp]
    if hit:
        raise InputError(f"leak: the run was trained on the {hit[0]} split of this dataset "
                         f"(fingerprint {run_fp}); refusing to evaluate on it")
    if run_fp != card_fp:
        why = ("the run records no train-split fingerprint (config.json), so nothing proves it "
               "never saw the test measurements" if run_fp is None else
               f"the run was trained on a different dataset (train fingerprint {run_fp}, this "
               f"dataset's is {card_fp})")
        if not allow_foreign_run:
            raise InputError(f"leak check: {why}. Evaluate it on the dataset it was trained on, "
                             "or pass --allow-foreign-run to check overlap on content")
        foreign = _foreign_train(run_config, run_fp, why)
        info["mode"] = "content (foreign run)"
        info["foreign_train_measurements"] = foreign.num_rows
        for name, tbl in test_sets.items():
            n = content_overlap(tbl, foreign)
            info["overlap"][f"{name} vs run train"] = n
            if n:
                raise InputError(f"leak: {n} measurements of {name} are in the train split the "
                                 "run was trained on; refusing to evaluate on them")
    for name, tbl in test_sets.items():
        n = content_overlap(tbl, train)
        info["overlap"][f"{name} vs dataset train"] = n
        if n:
            what = "the external set" if external else f"split {name}"
            raise InputError(f"leak: {n} measurements of {what} are also in this dataset's train "
                             "split (the model trained on them); remove them first")
    return info


def _foreign_train(run_config: dict, run_fp, why: str) -> pa.Table:
    from ping_llm.prepare import load_card
    from ping_llm.schema import read_canonical

    data_dir = (run_config.get("train") or {}).get("data_dir")
    if run_fp is None or not data_dir:
        raise InputError(f"leak check: {why}, and the run does not say where its training data "
                         "is, so overlap cannot be checked: refusing")
    try:
        card = load_card(data_dir)
    except InputError as e:
        raise InputError(f"leak check: {why}; its dataset {data_dir} is unreadable ({e})") from None
    if card["splits"]["train"]["fingerprint"] != run_fp:
        raise InputError(f"leak check: {why}; {data_dir} no longer holds the train split the run "
                         "was trained on (fingerprint differs): refusing")
    return read_canonical(Path(data_dir) / card["splits"]["train"]["parquet"])


def find_world_file(card: dict, data_dir) -> Path | None:
    """The synthetic world behind a dataset: card inputs -> ingest metadata -> FILE.world.json."""
    import pyarrow.parquet as pq

    from ping_llm.synth import world_path

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
# queries and context


def subsample(n: int, max_queries: int | None, seed: int, name: str) -> np.ndarray:
    """Deterministic uniform subsample of range(n) (sorted): default_rng([seed, crc32(name)])."""
    if not max_queries or n <= max_queries:
        return np.arange(n)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(n, size=max_queries, replace=False))


class ContextPool:
    """Measurements to draw in-context examples from, sorted by (source, time)."""

    def __init__(self, table: pa.Table):
        a = _table_arrays(table)
        order = np.lexsort((a["time"], a["src"].astype(str)))
        self.src = a["src"][order].astype(str)
        self.dst, self.rtt, self.time = a["dst"][order], a["rtt"][order], a["time"][order]
        self.sources, self.first = np.unique(self.src, return_index=True)
        self.last = np.r_[self.first[1:], len(self.src)]

    def before(self, src: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query: (lo, p) with rows [lo, p) the source's measurements strictly before t."""
        n = len(self.sources)
        i = np.minimum(np.searchsorted(self.sources, src.astype(str)), max(n - 1, 0))
        hit = (self.sources[i] == src.astype(str)) if n else np.zeros(len(src), bool)
        lo = np.where(hit, self.first[i] if n else 0, 0)
        hi = np.where(hit, self.last[i] if n else 0, 0)
        p = np.array([lo_ + np.searchsorted(self.time[lo_:hi_], tq, "left")
                      for lo_, hi_, tq in zip(lo, hi, t, strict=True)], dtype=np.int64)
        return lo, np.where(hit, p, lo)

    def context(self, lo: int, p: int, k: int, budget: int) -> list:
        """The k most recent measurements in [lo, p), time-ordered, cut to `budget` tokens."""
        rows = range(max(lo, p - k), p)
        ms = [tk.Measurement(self.src[r], self.dst[r], float(self.rtt[r]), int(self.time[r]))
              for r in rows]
        while ms and len(tk.encode_reference(ms)) > budget:
            ms = ms[1:]
        return ms


# ----------------------------------------------------------------------------------------------
# model: teacher-forced scores and exact distributions

_ROLE_LEN = {tk.SRC_IPV4: 5, tk.SRC_IPV6: 17, tk.DST_IPV4: 5, tk.DST_IPV6: 17, tk.TIMESTAMP_ABS: 9,
             tk.TIMESTAMP_DELTA1: 2, tk.TIMESTAMP_DELTA4: 5, tk.RTT_START: 3, tk.FAILED: 1}
_ROLE_FIELD = {tk.SRC_IPV4: "src", tk.SRC_IPV6: "src", tk.DST_IPV4: "dst", tk.DST_IPV6: "dst",
               tk.TIMESTAMP_ABS: "time", tk.TIMESTAMP_DELTA1: "time", tk.TIMESTAMP_DELTA4: "time",
               tk.RTT_START: "result", tk.FAILED: "result"}


def field_blocks(toks, start: int) -> list[tuple[str, int, int]]:
    """(field, first token, end) of each field of the measurement whose MEASUREMENT_START is at
    `start` (the last measurement of `toks`)."""
    out, pos = [], start + 1
    while pos < len(toks):
        n = _ROLE_LEN[toks[pos]]
        out.append((_ROLE_FIELD[toks[pos]], pos, pos + n))
        pos += n
    return out


def score_queries(model, seqs: list[list[int]], starts: list[int], device) -> list[dict]:
    """Teacher-forced log-probabilities of the last measurement of each token sequence.

    Per sequence: `tokens` {"start" (when not at position 0), "src.0", "src.1", ... } -> log P
    (nats) of each token given all before it; `fields` field -> summed log P; `result` the
    engine's constrained log P(result | preceding fields)."""
    import torch

    from ping_llm.query import CANON_B1

    b1_index = np.full(256, -1)
    b1_index[CANON_B1] = np.arange(len(CANON_B1))
    out: list[dict | None] = [None] * len(seqs)
    # Right-padding is exact here: attention is causal, so tokens after a sequence's end never
    # reach its positions, and RoPE positions start at 0 in every row. Sorting by length keeps
    # the padding small and the batches large.
    lens = np.array([len(x) for x in seqs])
    order = np.argsort(lens, kind="stable")
    s0 = 0
    while s0 < len(order):
        # a batch: <= 16k tokens (cache-friendly on CPU), <= 25% longer than its shortest row
        s1 = s0 + 1
        while (s1 < len(order) and lens[order[s1]] <= 1.25 * lens[order[s0]]
               and (s1 + 1 - s0) * lens[order[s1]] <= SCORE_BATCH_TOKENS):
            s1 += 1
        chunk, s0 = order[s0:s1], s1
        arr = np.zeros((len(chunk), max(len(seqs[i]) for i in chunk)), dtype=np.int64)
        for j, i in enumerate(chunk):
            arr[j, :len(seqs[i])] = seqs[i]  # the rest: MEASUREMENT_START padding, never read
        with torch.inference_mode():
            logits, _ = model(torch.as_tensor(arr, device=device))
        logits = logits.double()
        tok = torch.log_softmax(logits[:, :-1], -1).gather(
            -1, torch.as_tensor(arr[:, 1:, None], device=device))
        tok = tok.squeeze(-1).cpu().numpy()  # (B, L-1): log P(token t+1 | <= t)
        for j, i in enumerate(chunk):
            out[i] = _score_one(tok[j], logits[j], arr[j], seqs[i], starts[i], b1_index)
    return out


def _score_one(tok, lg, arr, seq, st, b1_index) -> dict:
    import torch

    from ping_llm.query import CANON_B1

    blocks = field_blocks(seq, st)
    toks = {} if st == 0 else {"start": float(tok[st - 1])}
    fields = {}
    for name, a, b in blocks:
        vals = tok[a - 1:b - 1]
        fields[name] = float(vals.sum())
        toks.update({f"{name}.{o}": float(v) for o, v in enumerate(vals)})
    _, a, _ = next(x for x in blocks if x[0] == "result")
    role = torch.log_softmax(lg[a - 1, [tk.RTT_START, tk.FAILED]], -1)
    res = float(role[0 if arr[a] == tk.RTT_START else 1])
    if arr[a] == tk.RTT_START:  # byte1 constrained to canonical values, as the engine does
        res += float(torch.log_softmax(lg[a, tk.BYTE0 + CANON_B1], -1)[b1_index[arr[a + 1]
                                                                                - tk.BYTE0]])
        res += float(torch.log_softmax(lg[a + 1, tk.BYTE0:], -1)[arr[a + 2] - tk.BYTE0])
    return {"tokens": toks, "fields": fields, "result": res}


def dense_pmf(dists) -> tuple[np.ndarray, np.ndarray]:
    """RTTDistributions -> (p_failed (N,), pmf (N, 33792) over GRID given a reply)."""
    pmf = np.zeros((len(dists), len(CANON)))
    pos = np.searchsorted(CANON, np.arange(65536))
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


# ----------------------------------------------------------------------------------------------
# aggregation


def _mean(x) -> float:
    """Mean of the finite values (NaN marks "not applicable to this row"); NaN if none."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else float("nan")


def _median(x) -> float:
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
            out[name] = _mean(r[key][ok] if key != "p_tail" else r[key])
    if "pit" in r and ok.any():
        out["pit_hist"] = M.pit_histogram(r["pit"][ok][np.isfinite(r["pit"][ok])],
                                          PIT_BINS)[0].tolist()
    if "p_failed" in r:
        p = r["p_failed"]
        out.update(roc_auc=M.roc_auc(p, failed), pr_auc=M.average_precision(p, failed),
                   brier=float(np.mean((p - failed) ** 2)) if len(p) else float("nan"),
                   mean_p_failed=_mean(p),
                   failed_rate=float(failed.mean()) if len(p) else float("nan"))
    if "logp" in r:
        out["logp_result"] = _mean(r["logp"])
    return out


def _bins(counts: np.ndarray, spec) -> np.ndarray:
    labels = np.empty(len(counts), dtype=object)
    for lo, hi, name in spec:
        labels[(counts >= lo) & ((counts <= hi) if hi is not None else True)] = name
    return labels


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


# ----------------------------------------------------------------------------------------------
# baselines


def fit_baselines(train: pa.Table, progress: bool = True) -> tuple[dict, dict]:
    """make_baselines() fitted on the train table -> (fitted, seconds per baseline)."""
    from ping_llm.baselines import make_baselines
    from ping_llm.observations import Observations

    obs = Observations.from_table(train)
    fitted, secs = {}, {}
    for name, b in make_baselines().items():
        t0 = time.perf_counter()
        fitted[name] = b.fit(obs)
        secs[name] = round(time.perf_counter() - t0, 3)
        if progress:
            print(f"eval: fitted {name} in {secs[name]:.1f} s", file=sys.stderr)
    return fitted, secs


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
        else:  # a point forecast: the CRPS of a point mass is the absolute error
            row["crps"] = np.where(ok, np.abs(med - y), np.nan)
            row["crps_cens"] = np.where(ok, np.abs(np.minimum(med, CENSOR_MS) - yc), np.nan)
            row["point_only"] = True
        if hasattr(b, "predict_p_failed"):
            pf = np.where(cov, b.predict_p_failed(src, dst), np.nan)
            row["p_failed"] = np.where(np.isnan(pf), g.p_failed, pf)
        out[name] = row
    return out


def baseline_summary(row: dict, obs, failed) -> dict:
    """A baseline's metrics on all queries with the global-median fallback (top level, and again
    under "fallback") and on the queries it covers ("covered")."""
    cov = row["covered"]
    fallback = summarize(obs, failed, row)
    return {**fallback, "kind": "baseline",  # top level: all queries, like the other methods
            "coverage": float(cov.mean()) if len(cov) else float("nan"),
            "point_only": bool(row.get("point_only", False)),
            "covered": summarize(obs, failed, row, cov), "fallback": fallback}


# ----------------------------------------------------------------------------------------------
# one evaluated set


@dataclass
class Queries:
    src: np.ndarray  # object (N,)
    dst: np.ndarray
    rtt: np.ndarray  # ms, -1 = failed
    time: np.ndarray  # epoch s
    version: np.ndarray

    @property
    def failed(self) -> np.ndarray:
        return self.rtt < 0

    @property
    def obs(self) -> np.ndarray:
        return np.where(self.rtt < 0, np.nan, self.rtt)

    def __len__(self) -> int:
        return len(self.rtt)

    def measurement(self, i: int, with_time: bool = True) -> tk.Measurement:
        t = int(self.time[i]) if with_time else None
        return tk.Measurement(str(self.src[i]), str(self.dst[i]), float(self.rtt[i]), t)


def _truth_pdf(truth, rows) -> tuple[np.ndarray, np.ndarray]:
    """(P(failed) (R,), pmf (R, 33792) over GRID given a reply) of truth rows."""
    t = truth[rows]
    pdf = t.pdf_codes()[:, CANON]
    return t.p_fail, pdf / pdf.sum(axis=1, keepdims=True)


_DIST_KEYS = ("crps", "crps_cens", "pit", "in50", "in90", "p_tail")


def _truth_pass(truth, tix: np.ndarray, q: Queries, rng) -> dict:
    """The generator's own distribution as a forecaster (rows without truth: NaN)."""
    n = len(q)
    out = {k: np.full(n, np.nan) for k in ("median", "p_failed", "logp") + _DIST_KEYS}
    has = np.flatnonzero(tix >= 0)
    codes = np.searchsorted(CANON, tk.rtt_to_code(np.maximum(q.rtt, 0)).astype(np.int64))
    for s in range(0, len(has), BLOCK):
        rows = has[s:s + BLOCK]
        pf, pdf = _truth_pdf(truth, tix[rows])
        dm = distribution_metrics(GRID, pdf, q.obs[rows], rng)
        out["median"][rows] = dm["q"][:, 2]
        for k in _DIST_KEYS:
            out[k][rows] = dm[k]
        out["p_failed"][rows] = pf
        p_obs = np.where(q.failed[rows], pf, (1 - pf) * pdf[np.arange(len(rows)), codes[rows]])
        out["logp"][rows] = np.log(np.maximum(p_obs, 1e-300))
    return out


def _kl(tpf, tpdf, pf, pmf) -> dict:
    """KL(true || model) per row: RTT codes given a reply (coarse bins spread), byte1 bins, and
    {failed} + codes."""
    mp = spread_coarse(pmf)
    b1 = (tpdf.reshape(len(tpdf), -1, 256).sum(2), pmf.reshape(len(pmf), -1, 256).sum(2))
    return {"kl_rtt": M.kl_divergence(tpdf, mp), "kl_byte1": M.kl_divergence(*b1),
            "kl_full": M.kl_divergence(np.c_[tpf, (1 - tpf)[:, None] * tpdf],
                                       np.c_[pf, (1 - pf)[:, None] * mp])}


def _model_pass(engine, q: Queries, ctxs: list, truth, tix, rng, bar=None) -> dict:
    """Per-query model results for one context setting (arrays of length N)."""
    from ping_llm.query import Query

    n = len(q)
    seqs, starts, seqs_nt = [], [], []
    for i in range(n):
        ctx = list(ctxs[i])
        starts.append(len(tk.encode_reference(ctx)))
        seqs.append(tk.encode_reference(ctx + [q.measurement(i)]))
        seqs_nt.append(tk.encode_reference(ctx + [q.measurement(i, with_time=False)]))
    sc = score_queries(engine.model, seqs, starts, engine.device)
    sc_nt = score_queries(engine.model, seqs_nt, starts, engine.device)
    out = {k: np.full(n, np.nan) for k in ("median", "p_failed", "kl_rtt", "kl_byte1", "kl_full")
           + _DIST_KEYS}
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
        for k in _DIST_KEYS:
            out[k][rows] = dm[k]
        out["p_failed"][rows] = pf
        has = tix[rows] >= 0
        if truth is not None and has.any():
            tpf, tpdf = _truth_pdf(truth, tix[rows][has])
            for k, v in _kl(tpf, tpdf, pf[has], pmf[has]).items():
                out[k][rows[has]] = v
        if bar is not None:
            bar.update(len(rows))
    return out


def _nll_summary(scores: list[dict]) -> dict:
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
    return {"per_field": {f: _mean(fields[f]) for f in order if f in fields},
            "per_token_by_field": {f: _mean(ntok[f]) for f in order if f in ntok},
            "per_position": {t: _mean(v) for t, v in pos.items()},
            "total": _mean([-sum(s["fields"].values()) for s in scores])}


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
    from ping_llm.query import Query

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
            qs = [Query(s, d, int(q_all.time[i]), context=pool.context(lo[j], p[j], k, budget))
                  for j, i in enumerate(pick)]
            pf, pmf = dense_pmf(engine.rtt_many(qs))
            p_b1 = pmf.reshape(len(pmf), -1, 256).sum(2).mean(0)
            ex["model"][str(k)] = {"p_byte1": p_b1.tolist(), "p_failed": float(pf.mean())}
        if truth_world is not None:
            try:
                tr = truth_world.truth(q_all.src[pick].astype(str), q_all.dst[pick].astype(str),
                                       q_all.time[pick].astype(float))
                ex["truth"] = {"p_byte1": tr.pdf_byte1()[:, _B1].mean(0).tolist(),
                               "p_failed": float(tr.p_fail.mean())}
            except InputError:
                pass
        out.append(ex)
    return out


_B1 = np.unique(CANON >> 8)  # the 132 canonical byte1 values


def _in_world(world, src, dst) -> np.ndarray:
    from ping_llm.synth import ANYCAST

    idx = world.index
    out = np.zeros(len(src), bool)
    for i, (s, d) in enumerate(zip(src, dst, strict=True)):
        out[i] = s in idx and d in idx and world.kind[idx[s] // 2] != ANYCAST
    return out


def _eval_set(name, table, *, engine, fitted, train_counts, pool, contexts, max_queries, seed,
              world, n_examples, progress) -> tuple[dict, dict]:
    """Everything for one evaluated set -> (metrics, plot data)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    idx = subsample(table.num_rows, max_queries, seed, name)
    a = _table_arrays(table.take(pa.array(idx, pa.int64())))
    q = Queries(a["src"], a["dst"], a["rtt"], a["time"], a["version"])
    obs, failed = q.obs, q.failed
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 1])
    res = {"n_total": table.num_rows, "n_evaluated": len(q),
           "subsample": {"seed": seed, "max_queries": max_queries,
                         "method": "uniform without replacement, numpy default_rng([seed, "
                         "crc32(name)]), kept in row order"},
           "n_success": int((~failed).sum()), "n_failed": int(failed.sum()),
           "ip_versions": {str(v): int((q.version == v).sum()) for v in (4, 6)},
           "methods": {}}
    plot = {"obs": obs, "failed": failed, "methods": {}}

    truth, tix = None, np.full(len(q), -1)
    if world is not None:
        has = _in_world(world, q.src, q.dst)
        res["truth_rows"] = int(has.sum())
        if has.any():
            truth = world.truth(q.src[has].astype(str), q.dst[has].astype(str),
                                q.time[has].astype(float))
            tix[has] = np.arange(int(has.sum()))

    budget = engine.config.sequence_len - 50  # room for the query (<= 47 tokens) + RTT bytes
    lo, p = pool.before(q.src, q.time)
    bar = tqdm(total=len(q) * len(contexts), desc=f"eval {name}", unit="q", file=sys.stderr,
               disable=not progress)
    per_method, prev = {}, None
    ok = ~failed
    for k in contexts:
        ctxs = [pool.context(lo[i], p[i], k, budget) for i in range(len(q))]
        n_ctx = np.array([len(c) for c in ctxs])
        t1 = time.perf_counter()
        if prev is not None and np.array_equal(n_ctx, prev[0]):
            out = prev[1]  # no query has more context than at the previous k: same answers
            bar.update(len(q))
        else:
            out = _model_pass(engine, q, ctxs, truth, tix, rng, bar)
        prev = (n_ctx, out)
        label = f"model k={k}"
        s = summarize(obs, failed, out)
        s.update(kind="model", context=k, context_mean=float(n_ctx.mean()) if len(q) else 0.0,
                 context_full_frac=float((n_ctx >= k).mean()) if len(q) else 0.0,
                 seconds=round(time.perf_counter() - t1, 2))
        s["nll"] = _nll_summary(out["scores"])
        s["nll_no_time"] = _nll_summary(out["scores_no_time"])
        s["timestamp_ablation"] = {
            "logp_result_with_time": _mean(out["logp"]),
            "logp_result_without_time": _mean(out["logp_no_time"]),
            "logp_rtt_with_time": _mean(out["logp"][ok]),
            "logp_rtt_without_time": _mean(out["logp_no_time"][ok]),
            "gain_nats": _mean(out["logp"] - out["logp_no_time"])}
        if truth is not None:
            s["kl"] = {kind: {"mean": _mean(out[kind]), "median": _median(out[kind])}
                       for kind in ("kl_rtt", "kl_byte1", "kl_full")}
        res["methods"][label] = s
        per_method[label] = out
        plot["methods"][label] = {x: out[x] for x in ("median", "p_failed", "pit", "kl_rtt")}
    bar.close()

    if truth is not None:
        tr = _truth_pass(truth, tix, q, rng)
        s = summarize(obs, failed, tr, tix >= 0)
        s.update(kind="truth", coverage=float((tix >= 0).mean()))
        res["methods"]["truth"] = s
        per_method["truth"] = tr
        plot["methods"]["truth"] = {x: tr[x] for x in ("median", "p_failed", "pit")}

    t1 = time.perf_counter()
    bp = baseline_predictions(fitted, q.src.astype(str), q.dst.astype(str), obs, failed)
    for bname, row in bp.items():
        res["methods"][bname] = baseline_summary(row, obs, failed)
        per_method[bname] = row
        plot["methods"][bname] = {"median": row["median"], "p_failed": row.get("p_failed"),
                                  "covered": row["covered"]}
    res["baseline_predict_seconds"] = round(time.perf_counter() - t1, 2)

    pair_counts, src_counts = train_counts
    pair_n = np.array([pair_counts.get((s_, d_), 0) for s_, d_ in zip(q.src, q.dst, strict=True)])
    src_n = np.array([src_counts.get(s_, 0) for s_ in q.src])
    groups = {"ip_version": np.array([f"IPv{v}" for v in q.version], dtype=object),
              "pair_seen_in_train": _bins(pair_n, PAIR_SEEN),
              "source_seen_in_train": _bins(src_n, SOURCE_SEEN)}
    res["breakdowns"] = breakdowns(groups, obs, failed, per_method)
    all_rows = _table_arrays(table)
    q_all = Queries(all_rows["src"], all_rows["dst"], all_rows["rtt"], all_rows["time"],
                    all_rows["version"])
    plot["examples"] = _examples(engine, name, table, q_all, pool, world, max(contexts), budget,
                                 n_examples)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res, plot


# ----------------------------------------------------------------------------------------------
# the entry point


def _train_counts(train: pa.Table) -> tuple[dict, dict]:
    g = train.group_by(["src_addr", "dst_addr"]).aggregate([("rtt", "count")])
    pairs = dict(zip(zip(g["src_addr"].to_pylist(), g["dst_addr"].to_pylist(), strict=True),
                     g["rtt_count"].to_pylist(), strict=True))
    s = train.group_by(["src_addr"]).aggregate([("rtt", "count")])
    return pairs, dict(zip(s["src_addr"].to_pylist(), s["rtt_count"].to_pylist(), strict=True))


def _check_args(max_queries, contexts, seed) -> tuple:
    if max_queries is not None and (isinstance(max_queries, bool) or int(max_queries) < 1):
        raise InputError(f"max_queries must be a positive integer or None, got {max_queries!r}")
    try:
        ks = sorted({int(k) for k in contexts})
    except (TypeError, ValueError):
        raise InputError(f"contexts must be integers, got {contexts!r}") from None
    if not ks or ks[0] < 0 or ks[-1] > 256:
        raise InputError(f"contexts must be integers in 0..256, got {contexts!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    return (None if max_queries is None else int(max_queries)), tuple(ks)


def evaluate(data_dir, run_dir, out_dir=None, *, test_paths=None, max_queries=MAX_QUERIES,
             contexts=CONTEXTS, seed: int = 0, device: str = "cpu", world=None,
             allow_foreign_run: bool = False, n_examples: int = 3, byte2_mass: float = BYTE2_MASS,
             progress: bool = True) -> dict:
    """Evaluate the run in `run_dir` on the dataset in `data_dir` (its test splits, or the
    canonical Parquet `test_paths` instead) and, with `out_dir`, write the report there
    (`report.write_report`). world: a synthetic world (synth.World or its .world.json path);
    found from the dataset's provenance when None. Returns the results (plain numbers, plus
    `plot_data` with per-query arrays)."""
    from ping_llm import __version__
    from ping_llm.checkpoint import find_checkpoint, read_config, read_meta
    from ping_llm.prepare import load_card
    from ping_llm.query import Engine
    from ping_llm.schema import read_canonical
    from ping_llm.synth import World

    t_start = time.perf_counter()
    max_queries, contexts = _check_args(max_queries, contexts, seed)
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
        sets = {"external": read_canonical(paths)}
        if sets["external"].num_rows == 0:
            raise InputError(f"no measurements in {[str(p) for p in paths]}")
    else:
        sets = {s: read_canonical(data_dir / card["splits"][s]["parquet"]) for s in EVAL_SPLITS
                if card["splits"].get(s, {}).get("measurements")}
        if not sets:
            raise InputError(f"{data_dir} has no non-empty test split")
    timings["read_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    leak = check_leak(card, run_config, train, sets, external=external,
                      allow_foreign_run=allow_foreign_run)
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

    t0 = time.perf_counter()
    fitted, fit_secs = fit_baselines(train, progress)
    timings["baselines_fit_s"] = round(time.perf_counter() - t0, 2)
    if not 0.5 <= byte2_mass <= 1.0:
        raise InputError(f"byte2_mass must be in [0.5, 1], got {byte2_mass}")
    engine = Engine.load(run_dir, device=device, byte2_mass=byte2_mass)
    counts = _train_counts(train)
    train_pool = ContextPool(train)

    results = {
        "format": "ping-llm-eval", "format_version": 1, "ping_llm": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data_dir": str(data_dir), "run_dir": str(run_dir),
        "dataset": {"fingerprints": {s: v.get("fingerprint") for s, v in card["splits"].items()},
                    "measurements": {s: v.get("measurements") for s, v in card["splits"].items()},
                    "counts": card.get("counts"), "time_range": card.get("time_range"),
                    "inputs": card.get("inputs")},
        "run": {"step": meta.get("step"), "model": run_config.get("model"),
                "preset": (run_config.get("train") or {}).get("preset"),
                "trainer": meta.get("trainer")},
        "settings": {"max_queries": max_queries, "contexts": list(contexts), "seed": seed,
                     "device": str(device), "levels": list(LEVELS), "pit_bins": PIT_BINS,
                     "byte2_mass": byte2_mass, "censor_ms": CENSOR_MS,
                     "baseline_crps_levels": len(BASELINE_LADDER),
                     "test_paths": [str(p) for p in paths] if external else None},
        "leak_check": leak,
        "synthetic": None if world is None else {
            "world_file": None if world_file is None else str(world_file),
            "fingerprint": world.fingerprint()},
        "synthetic_note": world_note,
        "baselines": {"fit_seconds": fit_secs, "train_measurements": train.num_rows},
        "splits": {}, "plot_data": {},
    }
    for name, table in sets.items():
        if external:
            results.setdefault("external", {})["seen_in_train"] = _seen_fractions(table, train)
        pool = ContextPool(table) if name == "test_probe" else train_pool
        res, plot = _eval_set(name, table, engine=engine, fitted=fitted, train_counts=counts,
                              pool=pool, contexts=contexts, max_queries=max_queries, seed=seed,
                              world=world, n_examples=n_examples, progress=progress)
        res["context_pool"] = ("own earlier test_probe measurements (source unseen in train)"
                               if name == "test_probe" else "train")
        results["splits"][name] = res
        results["plot_data"][name] = plot
        timings[f"{name}_s"] = res["seconds"]
    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    results["timings"] = timings
    if out_dir is not None:
        from ping_llm.report import write_report

        results["files"] = write_report(results, out_dir)
    return results
