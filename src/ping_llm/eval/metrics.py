"""Evaluation metrics for latency predictions: point error, calibration, failure ranking, KL.

Pure numpy, no sklearn, no torch: the evaluation harness feeds them arrays from the model's query
engine and from `ping_llm.eval.baselines`, and the same numbers go into the report. Units: RTTs in
milliseconds; probabilities in [0, 1]; KL in nats.

Conventions shared by every function here:
- Observed RTTs are successful replies only (>= 0 ms); the caller filters failures out (their
  prediction is scored by `roc_auc` / `average_precision` on P(failed) instead).
- A predictive distribution is either a pmf on a grid of RTT values (the model's 65,536 codes or
  the 256 byte1 bins), a set of quantiles (history baselines), or an empirical sample. Rows are
  test measurements: `pmf` is (N, G) with one shared grid (G,), `obs` is (N,).
- Bad shapes or non-finite inputs raise `InputError`: a NaN prediction means the caller forgot to
  mask uncovered rows or apply a fallback, and silently dropping it would flatter a method.
"""

from __future__ import annotations

import numpy as np

from ping_llm.errors import InputError

REL_ERROR_FLOOR_MS = 1e-3  # 1 µs: relative error divides by max(obs, this) so obs = 0 stays finite
KL_FLOOR = 1e-12  # model probabilities are floored here (then renormalised) so KL stays finite
_BLOCK = 1 << 21  # elements per temporary in the (N, G) computations (16 MB of float64)


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------

def _finite_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{name} has {int(np.sum(~np.isfinite(a)))} non-finite values "
                         "(mask uncovered rows or apply a fallback first)")
    return a


def _obs(obs, n: int | None = None) -> np.ndarray:
    y = _finite_1d(obs, "obs")
    if np.any(y < 0):
        raise InputError("obs must be successful RTTs (>= 0 ms); score failures with roc_auc")
    if n is not None and len(y) != n:
        raise InputError(f"obs has {len(y)} rows, predictions have {n}")
    return y


def _rows_per_block(g: int) -> int:
    return max(1, _BLOCK // max(g, 1))


def _grid_pmf(grid, pmf) -> tuple[np.ndarray, np.ndarray]:
    """Validate a grid (G,) and pmf (N, G) (or (G,)); drop grid points that are NaN and carry no
    mass (non-canonical RTT codes); sort the grid; normalise rows to sum to 1."""
    g = np.asarray(grid, dtype=np.float64)
    p = np.asarray(pmf, dtype=np.float64)
    if p.ndim == 1:
        p = p[None, :]
    if g.ndim != 1 or p.ndim != 2 or p.shape[1] != g.shape[0]:
        raise InputError(f"pmf must be (N, G) with grid (G,), got {p.shape} and {g.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise InputError("pmf must be finite and non-negative")
    bad = ~np.isfinite(g)
    if bad.any():
        if np.any(p[:, bad] > 0):
            raise InputError("pmf puts mass on non-finite grid values")
        g, p = g[~bad], p[:, ~bad]
    order = np.argsort(g, kind="stable")
    if np.any(order != np.arange(len(g))):
        g, p = g[order], p[:, order]
    total = p.sum(axis=1, keepdims=True)
    if np.any(total <= 0):
        raise InputError("every pmf row needs positive total mass")
    return g, p / total


# ---------------------------------------------------------------------------------------------
# point error of a predicted median
# ---------------------------------------------------------------------------------------------

def abs_errors(pred, obs) -> np.ndarray:
    """|pred - obs| in ms, elementwise."""
    p = _finite_1d(pred, "pred")
    return np.abs(p - _obs(obs, len(p)))


def relative_errors(pred, obs) -> np.ndarray:
    """|pred - obs| / max(obs, REL_ERROR_FLOOR_MS), elementwise (dimensionless)."""
    p = _finite_1d(pred, "pred")
    y = _obs(obs, len(p))
    return np.abs(p - y) / np.maximum(y, REL_ERROR_FLOOR_MS)


def point_error_summary(pred, obs) -> dict[str, float]:
    """MAE (ms), median absolute error (ms), relative error p50/p90 of a point prediction.

    Empty input gives NaNs with n = 0 (a breakdown cell with no rows), not an error.
    """
    ae, re = abs_errors(pred, obs), relative_errors(pred, obs)
    if len(ae) == 0:
        return {"n": 0, "mae_ms": np.nan, "median_ae_ms": np.nan, "rel_p50": np.nan,
                "rel_p90": np.nan}
    return {"n": int(len(ae)), "mae_ms": float(ae.mean()), "median_ae_ms": float(np.median(ae)),
            "rel_p50": float(np.quantile(re, 0.5)), "rel_p90": float(np.quantile(re, 0.9))}


# ---------------------------------------------------------------------------------------------
# CRPS
# ---------------------------------------------------------------------------------------------

def _crps_sorted(x: np.ndarray, w: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact CRPS of discrete distributions: support x (N|1, K) sorted along axis 1, weights
    w (N, K) summing to 1, observation y (N,). Uses the kernel form
    CRPS = E|X - y| - 1/2 E|X - X'|, and for sorted support
    E|X - X'| = 2 sum_k w_k x_k (F_{k-1} - (1 - F_k)) with F_k = sum_{l<=k} w_l."""
    e_xy = np.sum(w * np.abs(x - y[:, None]), axis=1)
    cdf = np.cumsum(w, axis=1)
    e_xx = 2.0 * np.sum(w * x * ((cdf - w) - (1.0 - cdf)), axis=1)
    return e_xy - 0.5 * e_xx


def crps_pmf(grid, pmf, obs) -> np.ndarray:
    """CRPS (ms) of a pmf on a grid of RTT values against observed RTTs, per row.

    Exact for the discrete distribution (no interpolation between grid points). pmf rows are
    renormalised; NaN grid points (non-canonical codes) must carry zero mass.
    """
    g, p = _grid_pmf(grid, pmf)
    y = _obs(obs, p.shape[0])
    out = np.empty(len(y))
    step = _rows_per_block(len(g))
    for s in range(0, len(y), step):
        out[s:s + step] = _crps_sorted(g[None, :], p[s:s + step], y[s:s + step])
    return out


def _samples(samples, obs):
    """Validated NaN-padded sample sets (N, S) -> (samples, obs (N,), valid mask, counts (N,))."""
    s = np.asarray(samples, dtype=np.float64)
    if s.ndim != 2:
        raise InputError(f"samples must be (N, S), got shape {s.shape}")
    y = _obs(obs, s.shape[0])
    valid = np.isfinite(s)
    n = valid.sum(axis=1)
    if np.any(n == 0):
        raise InputError("every row needs at least one finite sample")
    return s, y, valid, n


def crps_samples(samples, obs) -> np.ndarray:
    """CRPS (ms) of the empirical distribution of each row's samples (N, S), per row.

    Ragged sample sets are passed NaN-padded: NaNs are ignored; every row needs >= 1 sample.
    This is the exact CRPS of the empirical CDF (the "energy" form with 1/S weights).
    """
    s, y, valid, n = _samples(samples, obs)
    x = np.sort(np.where(valid, s, np.inf), axis=1)  # NaN padding sorts last, weight 0 below
    w = np.sort(valid, axis=1)[:, ::-1] / n[:, None]  # first n[i] entries get weight 1/n[i]
    x = np.where(w > 0, x, 0.0)
    return _crps_sorted(x, w, y)


def crps_quantiles(levels, qvalues, obs) -> np.ndarray:
    """Approximate CRPS (ms) from predicted quantiles, per row.

    Uses CRPS = 2 * integral_0^1 QS_tau(y, q_tau) d tau with the pinball loss
    QS_tau = (1{y < q} - tau)(q - y), integrated by the midpoint rule: each level tau_k stands
    for the part of [0, 1] nearest to it. Exact for a single level 0.5 and a point mass; with
    levels (k - 0.5)/Q it converges to the true CRPS as Q grows.
    levels: (Q,) strictly increasing in (0, 1); qvalues: (N, Q) ms.
    """
    t = _finite_1d(levels, "levels")
    q = np.asarray(qvalues, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != len(t):
        raise InputError(f"qvalues must be (N, {len(t)}), got {q.shape}")
    if not np.all(np.isfinite(q)):
        raise InputError("qvalues has non-finite values")
    if len(t) == 0 or np.any(np.diff(t) <= 0) or t[0] <= 0 or t[-1] >= 1:
        raise InputError("levels must be strictly increasing inside (0, 1)")
    y = _obs(obs, q.shape[0])
    bounds = np.concatenate([[0.0], (t[1:] + t[:-1]) / 2, [1.0]])
    width = np.diff(bounds)
    pinball = ((y[:, None] < q).astype(np.float64) - t[None, :]) * (q - y[:, None])
    return 2.0 * np.sum(pinball * width[None, :], axis=1)


# ---------------------------------------------------------------------------------------------
# quantiles, interval coverage, PIT
# ---------------------------------------------------------------------------------------------

def quantiles_from_pmf(grid, pmf, levels) -> np.ndarray:
    """Quantiles (N, Q) of pmf rows: the smallest grid value x with P(X <= x) >= tau."""
    g, p = _grid_pmf(grid, pmf)
    t = _finite_1d(levels, "levels")
    out = np.empty((p.shape[0], len(t)))
    step = _rows_per_block(len(g))
    for s in range(0, p.shape[0], step):
        cdf = np.cumsum(p[s:s + step], axis=1)
        for k, tau in enumerate(t):
            # first index with cdf >= tau; a tiny tolerance so a CDF that reaches tau only up to
            # rounding still counts (cdf is non-decreasing, so counting "below" finds it)
            idx = np.sum(cdf < tau - 1e-12, axis=1)
            out[s:s + step, k] = g[np.minimum(idx, len(g) - 1)]
    return out


def interval_coverage(lo, hi, obs) -> float:
    """Fraction of rows with lo <= obs <= hi (closed interval)."""
    a, b = _finite_1d(lo, "lo"), _finite_1d(hi, "hi")
    y = _obs(obs, len(a))
    if len(b) != len(a):
        raise InputError("lo and hi differ in length")
    if len(y) == 0:
        return float("nan")
    return float(np.mean((a <= y) & (y <= b)))


def central_interval_coverage(grid, pmf, obs, levels=(0.5, 0.9)) -> dict[float, float]:
    """Coverage of the central `level` intervals [q_(1-l)/2, q_(1+l)/2] of pmf rows.

    For a discrete distribution the closed interval holds at least `level` of the mass, so a
    calibrated model covers slightly more than nominal; report it next to the nominal level.
    """
    lv = [float(x) for x in levels]
    taus = np.array([t for lvl in lv for t in ((1 - lvl) / 2, (1 + lvl) / 2)])
    q = quantiles_from_pmf(grid, pmf, np.sort(taus))
    col = {t: i for i, t in enumerate(np.sort(taus))}
    return {lvl: interval_coverage(q[:, col[(1 - lvl) / 2]], q[:, col[(1 + lvl) / 2]], obs)
            for lvl in lv}


def pit_pmf(grid, pmf, obs, rng: np.random.Generator | None = None) -> np.ndarray:
    """Probability integral transform of obs under pmf rows, for a discrete predictive.

    With F(y-) = P(X < y) and F(y) = P(X <= y): the randomised PIT F(y-) + V (F(y) - F(y-)),
    V ~ U(0, 1), when `rng` is given (uniform under calibration, Czado et al. 2009), else the
    mid-PIT (F(y-) + F(y)) / 2 (deterministic; same mean, slightly peaked histogram). Pass obs
    snapped to the grid (e.g. code_to_rtt(rtt_to_code(obs))) so ties with grid values are exact.
    """
    g, p = _grid_pmf(grid, pmf)
    y = _obs(obs, p.shape[0])
    out = np.empty(len(y))
    step = _rows_per_block(len(g))
    for s in range(0, len(y), step):
        ps, ys = p[s:s + step], y[s:s + step, None]
        below = np.sum(ps * (g[None, :] < ys), axis=1)
        at = np.sum(ps * (g[None, :] == ys), axis=1)
        v = rng.random(len(below)) if rng is not None else 0.5
        out[s:s + step] = below + v * at
    return np.clip(out, 0.0, 1.0)


def pit_samples(samples, obs, rng: np.random.Generator | None = None) -> np.ndarray:
    """PIT of obs under each row's empirical distribution (NaN-padded (N, S)), same tie rule as
    `pit_pmf`."""
    s, y, valid, n = _samples(samples, obs)
    below = np.sum(valid & (s < y[:, None]), axis=1) / n
    at = np.sum(valid & (s == y[:, None]), axis=1) / n
    v = rng.random(len(y)) if rng is not None else 0.5
    return np.clip(below + v * at, 0.0, 1.0)


def pit_histogram(pit, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of PIT values on [0, 1]: (density (bins,), edges (bins + 1,)). A calibrated
    predictive gives density ~1 in every bin; U-shape = overconfident, hump = underconfident."""
    u = _finite_1d(pit, "pit")
    if bins < 1:
        raise InputError("bins must be >= 1")
    counts, edges = np.histogram(np.clip(u, 0, 1), bins=bins, range=(0.0, 1.0))
    density = counts / max(len(u), 1) * bins
    return density, edges


# ---------------------------------------------------------------------------------------------
# failure prediction
# ---------------------------------------------------------------------------------------------

def _labels_scores(score, label) -> tuple[np.ndarray, np.ndarray]:
    s = _finite_1d(score, "score")
    y = np.asarray(label)
    if y.shape != s.shape:
        raise InputError(f"label shape {y.shape} != score shape {s.shape}")
    if y.dtype != bool:
        if not np.all(np.isin(y, (0, 1))):
            raise InputError("label must be boolean or 0/1")
        y = y.astype(bool)
    return s, y


def roc_auc(score, label) -> float:
    """ROC-AUC of scores (higher = more likely failed) against boolean labels (True = failed).

    Mann-Whitney form with average ranks, so a tie between a positive and a negative counts 1/2.
    This equals sklearn.metrics.roc_auc_score (trapezoidal area under the ROC curve built from
    distinct thresholds). NaN when one class is absent (sklearn raises there instead).
    """
    s, y = _labels_scores(score, label)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    ranks = np.empty(len(s))
    # average rank (1-based) of each run of tied scores
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(score, label) -> float:
    """PR-AUC as average precision: sum_k (R_k - R_{k-1}) P_k over distinct score thresholds,
    highest first, all items tied at a threshold entering together.

    Same definition as sklearn.metrics.average_precision_score (step-wise, no interpolation).
    NaN when there is no positive.
    """
    s, y = _labels_scores(score, label)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = np.cumsum(y_sorted)[last_of_run]
    fp = (last_of_run + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# ---------------------------------------------------------------------------------------------
# distribution divergence and token NLL summaries
# ---------------------------------------------------------------------------------------------

def kl_divergence(p_true, q_model, floor: float = KL_FLOOR) -> np.ndarray:
    """KL(true || model) in nats per row, for pmfs (N, G) or (G,) on the same grid.

    Both are normalised to sum 1; terms with p = 0 contribute 0; the model's probabilities are
    floored at `floor` and renormalised first, so a model that rules out an observed bin pays
    about log(1/floor) ~ 27.6 nats per unit of true mass there instead of infinity.
    """
    p = np.asarray(p_true, dtype=np.float64)
    q = np.asarray(q_model, dtype=np.float64)
    if p.shape != q.shape or p.ndim not in (1, 2):
        raise InputError(f"p_true {p.shape} and q_model {q.shape} must have the same 1-D/2-D shape")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(q))) or np.any(p < 0) or np.any(q < 0):
        raise InputError("pmfs must be finite and non-negative")
    squeeze = p.ndim == 1
    p, q = np.atleast_2d(p), np.atleast_2d(q)
    if np.any(p.sum(axis=1) <= 0) or np.any(q.sum(axis=1) <= 0):
        raise InputError("every pmf row needs positive total mass")
    p = p / p.sum(axis=1, keepdims=True)
    q = q / q.sum(axis=1, keepdims=True)
    q = np.maximum(q, floor)
    q = q / q.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    kl = terms.sum(axis=1)
    return kl[0] if squeeze else kl


def mean_by_group(values, groups) -> dict:
    """Mean of `values` per distinct group label (e.g. token NLL per field id): {group: mean}."""
    v = _finite_1d(values, "values")
    g = np.asarray(groups)
    if g.shape != v.shape:
        raise InputError(f"groups shape {g.shape} != values shape {v.shape}")
    keys, inv = np.unique(g, return_inverse=True)
    sums = np.bincount(inv, weights=v, minlength=len(keys))
    counts = np.bincount(inv, minlength=len(keys))
    return {k.item() if hasattr(k, "item") else k: float(s / c)
            for k, s, c in zip(keys, sums, counts, strict=True)}
