"""Post-hoc calibration of the model's answers: a monotone map of the RTT CDF and a logistic map
of P(failed), fitted on the `val` split and stored in the run directory as calibration.json.

Why: a model trained on a few hundred sources is over-confident wherever it meets what it did not
memorise (new pairs, new probes, later weeks): its 90% central intervals cover 56-88% of outcomes
on menog. Training changes (identity augmentation) address the cause; this corrects what is left,
for every query path at once, without touching the weights.

The RTT maps are quantile recalibration (Kuleshov, Fenner & Ermon, ICML 2018): with u = F(y) the
probability integral transform of each observed RTT y under the model's CDF F, a calibrated model
has u ~ U(0, 1); R = the empirical CDF of the val PITs (interpolated linearly between KNOTS of its
quantiles) turns F into R(F), which is calibrated on val by construction. On the model's discrete
code grid the calibrated mass of each code is R(F(code)) - R(F(code-)): every code keeps its
place, mass moves between codes, the distribution stays on the grid. P(failed) gets Platt scaling:
logit p' = a logit p + b, fitted by logistic regression on the val outcomes. There is one RTT map
per band of context sizes (CONTEXT_FROM: 0, 1-3, 4-15, 16+ measurements), since how far the
model is from calibrated depends on how much context it reads, and one set of maps (and Platt
pair) per population of queries, by what the model trained on (the run's train split):
"known" (a pair of addresses it trained on), "new_pair" (a source it trained on, towards a
destination it never measured from there) and "new" (any other source, and prefixes). The model
is far more over-confident about a source it has to guess from context than about one it
memorised, and sharper than it should be about a known source's new destinations (menog: cov90
0.81 on held-out pairs with the known maps, against 0.93 on known pairs). The train split's
source addresses are stored as `known_sources`, its pairs as `known_pairs` (`pair_keys`: 64-bit
hashes, base64, 11 bytes a pair).

What it does not touch: token log-probabilities (`Engine.score`, eval's token NLL) and sampled
measurements are the model's own; distributions (`rtt`, `rtt_many`, `rank`, partial addresses,
the server) are calibrated. `ping-llm calibrate` fits the "new" maps on val asked about its
probes re-addressed and on the val_probe split's new probes (`calibrate.calibrate`): val itself
holds known probes only (its held-out pairs, a third of it on menog, are the "new_pair"
population).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ping_llm.errors import InputError

CALIBRATION_FILE = "calibration.json"
FORMAT = "ping-llm-calibration/1"
KNOTS = 25  # quantiles of the val PITs that define a map (>= 2 replies per knot, ~40 in practice)
# Context-size bands with a map each: the model is sharper with more context, and how much it
# is over-confident changes with it (menog val: cov50 0.45 at k = 0, 0.35 at k = 64).
CONTEXT_FROM = (0, 1, 4, 16)
P_CLIP = 1e-6  # P(failed) kept inside [P_CLIP, 1 - P_CLIP] before the logit


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), P_CLIP, 1 - P_CLIP)
    return np.log(p) - np.log1p(-p)


POPULATIONS = ("known", "new_pair", "new")  # did the model train on this pair? this source?
# Too few val replies of new pairs to fit on: a known source's maps serve them (as they did
# before pairs were told apart), not everyone's, which new sources dominate.
FALLBACK = {"new_pair": "known"}
# Populations whose maps are symmetric about the median (fitted on the PITs u and their mirror
# 1 - u, so R(1/2) = 1/2): they widen or narrow the model's distribution but keep its median.
# Val's held-out pairs tell how wrong the spread is for a pair the model never saw, but the side
# its errors fall on belongs to those pairs: learnt, it moved other pairs' medians away
# (docs/results.md, "Defaults chosen on val: calibration").
SYMMETRIC = {"new_pair"}


def pair_keys(src, dst) -> np.ndarray:
    """A 64-bit key per (source, destination) address pair: blake2b of the two addresses as
    written (the same in every process, unlike Python's salted str hash)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(f"{s} {d}".encode(), digest_size=8).digest(), "little")
         for s, d in zip(src, dst, strict=True)], np.uint64)


@dataclass
class Calibration:
    """RTT maps per source population and context size, and Platt scaling per population.

    maps[pop] (pop one of POPULATIONS) is a list of {"min_context": m, "u": knots, "r": R(knots)}:
    map i serves queries with at least m (and fewer than the next map's m) context
    measurements; knots 0 = u_0 < ... < u_n = 1, values 0 = R(u_0) <= ... <= R(u_n) = 1.
    platt[pop] = (a, b). A query is "known" when its source is one of `known_sources` (the
    train split's source addresses) and the pair one of `known_pairs` (base64 of the sorted
    `pair_keys` of the train split's pairs), "new_pair" when only its source is known (or the
    destination is a prefix), "new" otherwise (any other source, and every source prefix).
    Calibrations from before pairs were told apart have no "new_pair": their "known" maps serve
    those queries, as they did. `fitted` says on what (run step, dataset, split, outcomes)."""

    maps: dict
    platt: dict
    known_sources: list = field(default_factory=list)
    fitted: dict = field(default_factory=dict)
    known_pairs: str | None = None

    def __post_init__(self):
        if self.known_pairs is None and isinstance(self.maps, dict) and "new_pair" not in self.maps:
            self.maps = {**self.maps, "new_pair": self.maps.get("known")}  # an older file
            if isinstance(self.platt, dict):
                self.platt = {**self.platt, "new_pair": self.platt.get("known")}
        ok = (isinstance(self.maps, dict) and set(self.maps) == set(POPULATIONS)
              and isinstance(self.platt, dict) and set(self.platt) == set(POPULATIONS))
        for pop in POPULATIONS if ok else ():
            bands = self.maps[pop]
            ok = ok and isinstance(bands, list) and len(bands) > 0
            for m in bands if ok else []:
                u = np.asarray(m.get("u", []), np.float64)
                r = np.asarray(m.get("r", []), np.float64)
                ok = ok and (u.ndim == 1 and u.shape == r.shape and len(u) >= 2
                             and bool(np.all(np.isfinite(u)) and np.all(np.isfinite(r)))
                             and u[0] == 0 and u[-1] == 1 and r[0] == 0 and r[-1] == 1
                             and bool(np.all(np.diff(u) > 0) and np.all(np.diff(r) >= 0)))
            starts = [m.get("min_context") for m in bands] if ok else []
            ok = ok and starts[0] == 0 and all(isinstance(x, int) for x in starts) \
                and starts == sorted(set(starts))
            a, b = self.platt[pop] if ok else (0.0, 0.0)
            ok = ok and math.isfinite(a) and math.isfinite(b) and a > 0
        if not ok:
            raise InputError("a calibration needs, for each of the populations "
                             f"{', '.join(POPULATIONS)}, maps "
                             "ordered by min_context from 0, each with knots 0 = u_0 < ... < "
                             "u_n = 1 and values 0 = R(u_0) <= ... <= R(u_n) = 1, and Platt "
                             "(a, b) with a finite slope a > 0")
        self.platt = {p: [float(x) for x in self.platt[p]] for p in POPULATIONS}
        self.known_sources = sorted(self.known_sources)
        self._known = frozenset(self.known_sources)
        try:
            self._pairs = (None if self.known_pairs is None else
                           np.frombuffer(base64.b64decode(self.known_pairs, validate=True), "<u8"))
        except ValueError:
            raise InputError("known_pairs must be base64 of 8-byte keys") from None

    @classmethod
    def identity(cls) -> Calibration:
        same = [{"min_context": 0, "u": [0.0, 1.0], "r": [0.0, 1.0]}]
        return cls({p: same for p in POPULATIONS}, {p: (1.0, 0.0) for p in POPULATIONS})

    # -- applying ------------------------------------------------------------------------------

    def population(self, src: str | None, dst: str | None = None) -> str:
        """"known" for a pair of addresses the model trained on, "new_pair" for a known source
        towards anything else, "new" for any other source (None: a prefix)."""
        if src is None or src not in self._known:
            return "new"
        if self._pairs is None:
            return "known"
        if dst is None:
            return "new_pair"
        k = pair_keys([src], [dst])[0]
        i = int(np.searchsorted(self._pairs, k))
        return "known" if i < len(self._pairs) and self._pairs[i] == k else "new_pair"

    def map_for(self, n_context: int, population: str = "known") -> dict:
        bands = self.maps[population]
        starts = [m["min_context"] for m in bands]
        return bands[int(np.searchsorted(starts, n_context, "right")) - 1]

    def cdf(self, F: np.ndarray, n_context: int = 0, population: str = "known") -> np.ndarray:
        """R(F), elementwise, with the map of this population and context size."""
        m = self.map_for(n_context, population)
        return np.interp(F, m["u"], m["r"])

    def probs(self, probs: np.ndarray, n_context: int = 0,
              population: str = "known") -> np.ndarray:
        """Calibrated masses of codes (..., K) in ascending order (each row sums to 1)."""
        F = np.cumsum(probs, axis=-1)
        F /= F[..., -1:]
        G = self.cdf(F, n_context, population)
        return np.maximum(np.diff(G, axis=-1, prepend=0.0), 0.0)

    def p_failed(self, p, population: str = "known") -> np.ndarray | float:
        a, b = self.platt[population]
        out = 1.0 / (1.0 + np.exp(-(a * _logit(p) + b)))
        return float(out) if np.ndim(out) == 0 else out

    # -- fitting -------------------------------------------------------------------------------

    @classmethod
    def fit(cls, pit, n_context, p_failed, failed, population, known_sources=(),
            known_pairs: np.ndarray | None = None, context_from=CONTEXT_FROM,
            fitted: dict | None = None, symmetric=SYMMETRIC) -> Calibration:
        """From val: PITs of the replies (NaN for failed pings), the context size of each
        query, predicted P(failed), the outcomes, and each query's population (one of
        POPULATIONS, as `population` puts it at query time); known_pairs: `pair_keys` of the
        train split. A band with too few replies uses its population's map over all context
        sizes, and a population with too few replies (or failures) uses its FALLBACK's maps
        (Platt pair), or else everyone's. symmetric: the populations with symmetric maps."""
        pit = np.asarray(pit, np.float64)
        n_context = np.asarray(n_context, np.int64)
        population = np.asarray(population, str)
        p_failed, failed = np.asarray(p_failed, np.float64), np.asarray(failed, bool)
        if not (pit.shape == n_context.shape == population.shape == p_failed.shape
                == failed.shape):
            raise InputError("pit, n_context, p_failed, failed and population must be equally "
                             "long")
        if not np.isin(population, POPULATIONS).all():
            raise InputError(f"populations must be among {POPULATIONS}")
        ok = np.isfinite(pit)
        everyone = _quantile_map(pit[ok])
        if everyone is None:
            raise InputError(f"{int(ok.sum())} replies are too few to calibrate on (need "
                             f"{2 * KNOTS}); evaluate more val queries")
        platt_all = _platt(p_failed, failed)
        bands = list(context_from) + [np.iinfo(np.int64).max]
        maps, platt, used = {}, {}, {}
        def fit_map(sel, pop):
            u = pit[sel]
            return _quantile_map(np.r_[u, 1 - u] if pop in symmetric else u, len(u))

        for pop in POPULATIONS:  # "known" first: "new_pair" falls back on it
            mine = population == pop
            own = fit_map(ok & mine, pop)
            like = FALLBACK.get(pop)
            maps[pop] = []
            for lo, hi in zip(bands[:-1], bands[1:], strict=True):
                sel = ok & mine & (n_context >= lo) & (n_context < hi)
                used[f"{pop} {lo}+"] = int(sel.sum())
                if own is None and like is not None:
                    maps[pop].append(maps[like][len(maps[pop])])
                else:
                    maps[pop].append({"min_context": int(lo),
                                      **(fit_map(sel, pop) or own or everyone)})
            enough = mine.sum() >= 2 * KNOTS and failed[mine].any() and (~failed[mine]).any()
            platt[pop] = (_platt(p_failed[mine], failed[mine]) if enough
                          else platt[like] if like is not None else platt_all)
        pairs = (None if known_pairs is None else base64.b64encode(
            np.sort(np.asarray(known_pairs, np.uint64)).astype("<u8").tobytes()).decode())
        return cls(maps, platt, sorted(set(known_sources)),
                   dict(fitted or {}, replies=int(ok.sum()), replies_per_band=used,
                        outcomes=int(len(pit))), pairs)

    # -- files -----------------------------------------------------------------------------------

    def save(self, run_dir) -> Path:
        path = Path(run_dir) / CALIBRATION_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, run_dir) -> Calibration | None:
        """The run's calibration, or None when it has none."""
        path = Path(run_dir) / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{path} is unreadable ({e}); fit it again with "
                             "`ping-llm calibrate` or delete it") from None
        if not isinstance(d, dict) or d.pop("format", None) != FORMAT:
            raise InputError(f"{path} is not a {FORMAT} file")
        try:
            return cls(**d)
        except TypeError as e:
            raise InputError(f"{path}: {e}") from None


def _quantile_map(pit: np.ndarray, replies: int | None = None) -> dict | None:
    """R = the empirical CDF of these PITs at KNOTS quantiles, plus its two extremes: the
    smallest and largest PIT of n get levels 1/(n+1) and n/(n+1). Without them the outer
    segments would hand 1/KNOTS of the mass each to wherever the model's own CDF is flat near 0
    or 1 -- its far tail (RTTs of hours), where no outcome ever fell. None when fewer than
    2 * KNOTS replies (`replies`: how many the PITs stand for; mirrored ones count once)."""
    n = len(pit)
    if (n if replies is None else replies) < 2 * KNOTS:
        return None
    levels = np.r_[1 / (n + 1), np.arange(1, KNOTS) / KNOTS, n / (n + 1)]
    q = np.r_[pit.min(), np.quantile(pit, levels[1:-1]), pit.max()]
    u, keep = np.unique(np.clip(q, 1e-12, 1 - 1e-12), return_index=True)  # ties merged
    return {"u": [0.0, *u.tolist(), 1.0], "r": [0.0, *levels[keep].tolist(), 1.0]}


def _platt(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Logistic regression of y on logit(p) (Newton, a light ridge towards the identity a=1, b=0
    so that a val without failures or with perfectly separated ones stays finite)."""
    if len(p) != len(y) or len(p) == 0:
        raise InputError("P(failed) and outcomes must be non-empty and of equal length")
    x = _logit(p)
    X = np.stack([x, np.ones_like(x)], axis=1)  # (n, 2)
    w = np.array([1.0, 0.0])
    ridge = 1.0  # one pseudo-observation's worth
    for _ in range(50):
        z = X @ w
        s = 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic, without overflow for large |z|
        g = X.T @ (s - y) + ridge * (w - [1.0, 0.0])
        H = (X * (s * (1 - s))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    a, b = float(w[0]), float(w[1])
    if not a > 0:  # failure odds that fall as the model's rise: keep the model's ranking
        a, b = 1.0, 0.0
    return a, b
