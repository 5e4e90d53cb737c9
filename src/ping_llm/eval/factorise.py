"""Matrix-factorisation latency baselines: DMFSGD and biased MF, with in-context fold-in.

Both fit the matrix of train pair medians (one entry per (src, dst) pair with a successful ping)
and predict pairs whose source was seen as a source and destination as a destination in train.
With k context measurements of a source (`ping_llm.data.observations.SourceContext`, the same k the
model gets), `predict_in_context` folds the source in: its source-side parameters are re-fitted
on its successful context measurements (one pair median per context destination) with every
destination side fixed, as a new node joining a deployed system would, then it predicts. A cold
source without any usable context measurement cannot be answered (NaN); a train source keeps its
fitted parameters when its context adds nothing and is otherwise re-fitted on its train pair
medians plus the context ones. `baselines.make_baselines` includes both models; split from
`ping_llm.eval.baselines` to keep each module readable.
"""

from __future__ import annotations

import math

import numpy as np

from ping_llm.data.observations import Observations, group_contexts, lookup, require_success
from ping_llm.errors import InputError


def _group_medians(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct keys, median of the values of each key) -- np.median per group."""
    order = np.lexsort((values, keys))
    k, x = keys[order], values[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]]) if len(k) else np.zeros(0, int)
    counts = np.diff(np.r_[starts, len(k)])
    lo, hi = starts + (counts - 1) // 2, starts + counts // 2
    return k[starts], (x[lo] + x[hi]) / 2.0


def _pair_medians(train: Observations):
    """(src id, dst id, median successful RTT ms) per train pair, sorted by (src, dst): both
    factorisations fit the matrix of pair medians (one entry per pair, robust to jitter and to
    heavy pairs dominating)."""
    ok = train.ok
    n = len(train.nodes)
    keys, med = _group_medians(train.src_id[ok] * n + train.dst_id[ok], train.rtt[ok])
    return keys // n, keys % n, med


class _MatrixModel:
    """Shared plumbing: node index over the union of addresses, seen-as-source/destination
    masks, the RTT <-> target transform and the context fold-in. Targets:
    - "log": log(max(rtt, 0.01 ms)), so errors are relative (a 10 ms miss matters more at 20 ms
      than at 300 ms) and heavy tails do not dominate the squared loss;
    - "log1p": log(1 + rtt / 1 ms), the same as "log" well above 1 ms but >= 0 for every RTT
      >= 0 and ~linear below 1 ms, so non-negative factors can still express sub-ms RTTs;
    - "linear": ms directly (predictions clipped at 0).
    On Seattle held-out pairs the log targets win for both models (BiasedMF median abs error
    18.9 ms vs 24.8)."""

    LOG_FLOOR_MS = 0.01
    TARGETS = ("log", "log1p", "linear")

    def _to_target(self, x: np.ndarray) -> np.ndarray:
        if self.target == "log":
            return np.log(np.maximum(x, self.LOG_FLOOR_MS))
        if self.target == "log1p":
            return np.log1p(np.maximum(x, 0.0))
        return x

    def _from_target(self, t: np.ndarray) -> np.ndarray:
        if self.target == "log":
            return np.exp(t)
        return np.maximum(np.expm1(t) if self.target == "log1p" else t, 0.0)

    def _prepare(self, train: Observations):
        require_success(train)
        if self.target not in self.TARGETS:
            raise InputError(f"target must be one of {self.TARGETS}, got {self.target!r}")
        self._nodes = train.nodes
        i, j, med = _pair_medians(train)
        n = len(self._nodes)
        self._src_seen = np.bincount(i, minlength=n) > 0
        self._dst_seen = np.bincount(j, minlength=n) > 0
        t = self._to_target(med)
        # train rows by source (already sorted), for re-fitting a train source with context
        self._rows = (j, t, np.searchsorted(i, np.arange(n + 1)))
        return i, j, t, n

    def coverage(self, src, dst) -> np.ndarray:
        i, j = lookup(self._nodes, src), lookup(self._nodes, dst)
        return ((i >= 0) & (j >= 0) & self._src_seen[np.maximum(i, 0)]
                & self._dst_seen[np.maximum(j, 0)])

    def predict(self, src, dst) -> np.ndarray:
        i, j = lookup(self._nodes, src), lookup(self._nodes, dst)
        t = self._predict_target(self._source_params(np.maximum(i, 0)), np.maximum(j, 0))
        return np.where(self.coverage(src, dst), self._from_target(t), np.nan)

    def _fold_rows(self, reps):
        """Rows (group, dst id, target) to fit each group's source side on, the groups' source
        ids (-1: cold) and which groups have a context row."""
        n = len(self._nodes)
        sid = lookup(self._nodes, [s for s, _ in reps])
        sid = np.where((sid >= 0) & self._src_seen[np.maximum(sid, 0)], sid, -1)
        lens = [len(c) for _, c in reps]
        g = np.repeat(np.arange(len(reps)), lens)
        cdst = np.concatenate([c.dst for _, c in reps]) if reps else np.zeros(0, str)
        crtt = np.concatenate([c.rtt for _, c in reps]) if reps else np.zeros(0)
        cj = lookup(self._nodes, cdst)
        keep = (crtt >= 0) & (cj >= 0) & self._dst_seen[np.maximum(cj, 0)]
        keys, med = _group_medians(g[keep] * n + cj[keep], crtt[keep])
        rows_g, rows_j, rows_t = [keys // n], [keys % n], [self._to_target(med)]
        has_ctx = np.bincount(keys // n, minlength=len(reps)) > 0
        tj, tt, start = self._rows
        for k in np.flatnonzero((sid >= 0) & has_ctx):
            a, b = start[sid[k]], start[sid[k] + 1]
            rows_g.append(np.full(b - a, k))
            rows_j.append(tj[a:b])
            rows_t.append(tt[a:b])
        return (np.concatenate(rows_g), np.concatenate(rows_j), np.concatenate(rows_t), sid,
                has_ctx)

    def predict_in_context(self, src, dst, contexts) -> np.ndarray:
        """(N,) medians for queries whose sources bring `contexts` (one SourceContext each):
        the source side is folded in on the context (see the module docstring); NaN where the
        destination was never a train destination or a cold source has no usable context."""
        src, gid, reps = group_contexts(src, contexts)
        j = lookup(self._nodes, dst)
        if len(j) != len(src):
            raise InputError("src and dst must have the same length")
        g, rj, rt, sid, has_ctx = self._fold_rows(reps)
        params = self._source_params(np.maximum(sid, 0))
        if has_ctx.any():
            params[has_ctx] = self._fold(g, rj, rt, params, sid < 0)[has_ctx]
        answered = (has_ctx | (sid >= 0))[gid] & (j >= 0) & self._dst_seen[np.maximum(j, 0)]
        t = self._predict_target(params[gid], np.maximum(j, 0))
        return np.where(answered, self._from_target(t), np.nan)


class DMFSGD(_MatrixModel):
    """DMFSGD (Liao, Du, Geurts, Leduc, IEEE/ACM ToN 2013): every node i holds an outgoing
    vector u_i and an incoming vector v_i (rank `rank`), the predicted distance is u_i . v_j,
    and each measurement x_ij drives a regularised SGD step on u_i and v_j:
        u_i -= lr * (dloss(u_i.v_j - x_ij) * v_j + lam * u_i), v_j likewise,
    followed (`nonneg`, default on) by a projection onto u, v >= 0 so predictions stay >= 0.
    Loss: "l2" (squared), "l1" (absolute) or "huber" (quadratic within `huber_delta` of the
    target, linear beyond: robust to outlier pair medians).

    Centralised simulation of the decentralised rounds: an epoch shuffles the train pair medians
    into batches of `batch_size`; within a batch every node takes one step with the average of
    its gradients (a node's round with the neighbours it measured), so the step size does not
    depend on how many of the node's pairs landed in the batch. Defaults: rank 10, log1p target,
    Huber loss (delta 0.2 in log units, i.e. ~20% relative error), lam 0.01, lr 0.1, 300 epochs
    of batches of 1024. Chosen on Seattle held-out pairs (median abs error, ms): Huber 16.1 vs
    l2 21.7 vs l1 32.3 (l1's sign steps converge slowly); linear target 32 vs log 21 (l2);
    log1p 15.95 vs log 16.06 (Huber; no sub-ms RTTs there, so the two targets nearly agree).

    Fold-in (`predict_in_context`): u_i minimises the objective the SGD rule descends for one
    node, mean_j loss(u.v_j - x_ij) + lam/2 |u|^2 (u >= 0 if `nonneg`), over its context pair
    medians with every v_j fixed: up to `fold_steps` projected accelerated gradient steps (FISTA
    with step 1/L, L the curvature bound, restarted when it overshoots, stopped once no u moves;
    plain projected subgradient steps shrinking as 1/sqrt(t) for "l1"), from the mean train u
    of the sources (a cold node) or its own fitted u_i.

    Departures from the paper: the paper factorises the RTT matrix itself; we factorise
    log1p(RTT in ms) by default (the paper's choice is target="linear"): relative errors, and
    still >= 0 so the non-negative factors keep their meaning and sub-ms RTTs stay expressible
    (a log target cannot go below 1 ms with non-negative factors: exp(u.v) >= 1). It fits pair
    medians in a centralised batched simulation over every train pair (the paper: each node
    samples k random neighbours and updates as measurements arrive); Huber loss, step sizes and
    epochs are ours; the fold-in solves the new node's problem to convergence instead of
    running its SGD steps as measurements arrive.
    """

    def __init__(self, rank: int = 10, loss: str = "huber", lam: float = 0.01, lr: float = 0.1,
                 epochs: int = 300, batch_size: int = 1024, huber_delta: float = 0.2,
                 nonneg: bool = True, target: str = "log1p", fold_steps: int = 500,
                 seed: int = 0):
        if (rank < 1 or epochs < 1 or batch_size < 1 or lr <= 0 or lam < 0 or huber_delta <= 0
                or fold_steps < 1):
            raise InputError("need rank, epochs, batch_size, fold_steps >= 1, lr > 0, lam >= 0, "
                             "delta > 0")
        if loss not in ("l2", "l1", "huber"):
            raise InputError("loss must be 'l2', 'l1' or 'huber'")
        self.rank, self.loss, self.lam, self.lr = rank, loss, lam, lr
        self.epochs, self.batch_size, self.huber_delta = epochs, batch_size, huber_delta
        self.nonneg, self.target, self.fold_steps, self.seed = nonneg, target, fold_steps, seed

    def _dloss(self, r: np.ndarray) -> np.ndarray:
        if self.loss == "l2":
            return r
        if self.loss == "l1":
            return np.sign(r)
        return np.clip(r, -self.huber_delta, self.huber_delta)

    def fit(self, train: Observations) -> DMFSGD:
        i, j, t, n = self._prepare(train)
        rng = np.random.default_rng(self.seed)
        # start near the right scale: E[u.v] = rank * s^2 / 4 ~ mean target for U(0, s) entries
        s = 2.0 * math.sqrt(max(float(np.mean(t)), 1e-3) / self.rank)
        U = rng.uniform(0, s, (n, self.rank))
        V = rng.uniform(0, s, (n, self.rank))
        m, r = len(t), self.rank
        cols = np.arange(r)

        def per_node_mean(nodes, grads):  # average gradient per node over the batch, (n, r)
            total = np.bincount((nodes[:, None] * r + cols).ravel(), weights=grads.ravel(),
                                minlength=n * r).reshape(n, r)
            return total / np.maximum(np.bincount(nodes, minlength=n), 1)[:, None]

        for _ in range(self.epochs):
            perm = rng.permutation(m)
            for b in range(0, m, self.batch_size):
                idx = perm[b:b + self.batch_size]
                bi, bj, bt = i[idx], j[idx], t[idx]
                ui, vj = U[bi], V[bj]
                g = self._dloss(np.sum(ui * vj, axis=1) - bt)[:, None]
                U -= self.lr * per_node_mean(bi, g * vj + self.lam * ui)
                V -= self.lr * per_node_mean(bj, g * ui + self.lam * vj)
                if self.nonneg:
                    np.maximum(U, 0.0, out=U)
                    np.maximum(V, 0.0, out=V)
        self.U_, self.V_ = U, V
        self._u_mean = U[self._src_seen].mean(axis=0)
        return self

    def _source_params(self, i):
        return self.U_[i].copy()

    def _predict_target(self, u, j):
        return np.sum(u * self.V_[j], axis=1)

    def _fold(self, g, j, t, init, cold):
        """u per group minimising its mean loss + lam/2 |u|^2 over rows (g, j, t), V fixed,
        starting from `init` (cold groups: the mean train u); groups without rows keep it."""
        lam = self.lam
        out = np.where(cold[:, None], self._u_mean, init)
        if len(g) == 0:
            return out
        order = np.argsort(g, kind="stable")
        groups, starts, cnt = np.unique(g[order], return_index=True, return_counts=True)
        gc = np.repeat(np.arange(len(groups)), cnt)  # compact group of each sorted row
        V, t = self.V_[j[order]], t[order]
        gram = np.stack([np.add.reduceat(V * V[:, [a]], starts, axis=0)
                         for a in range(self.rank)], axis=1)
        step = 1.0 / (np.linalg.eigvalsh(gram)[:, -1] / cnt + lam + 1e-12)

        def grad(u):
            d = self._dloss(np.sum(u[gc] * V, axis=1) - t)[:, None] * V
            return np.add.reduceat(d, starts, axis=0) / cnt[:, None] + lam * u

        x = np.maximum(out[groups], 0.0) if self.nonneg else out[groups]
        y, mom = x.copy(), np.ones(len(groups))
        for k in range(self.fold_steps):
            if self.loss == "l1":  # non-smooth: plain projected subgradient, shrinking steps
                x = x - (step / math.sqrt(k + 1.0))[:, None] * grad(x)
                x = np.maximum(x, 0.0) if self.nonneg else x
                continue
            new = y - step[:, None] * grad(y)
            new = np.maximum(new, 0.0) if self.nonneg else new
            restart = np.sum((y - new) * (new - x), axis=1) > 0  # overshoot: drop momentum
            mom_next = (1.0 + np.sqrt(1.0 + 4.0 * mom ** 2)) / 2.0
            beta = np.where(restart, 0.0, (mom - 1.0) / mom_next)
            y = new + beta[:, None] * (new - x)
            moved = np.max(np.abs(new - x)) if k % 10 == 9 else np.inf
            x, mom = new, np.where(restart, 1.0, mom_next)
            if moved <= 1e-9 * (1.0 + np.max(np.abs(x))):  # converged everywhere
                break
        out[groups] = x
        return out


class BiasedMF(_MatrixModel):
    """Biased matrix factorisation: target(x_ij) ~ mu + b_i + c_j + p_i . q_j, with mu the mean
    train target, b/p the source side and c/q the destination side of each node.

    Fitted by alternating least squares with weighted-lambda ridge (ALS-WR, Zhou et al. 2008):
    with the destination side fixed, each source's (b_i, p_i) is the exact ridge solution over
    its observed pairs with penalty lam * n_i, and vice versa; `iters` alternations (each solve
    is exact, so ~20 suffice). Defaults: rank 10, lam 0.05, 20 iterations, log target. rank 0
    is the pure bias model mu + b_i + c_j (x = a_i * b_j multiplicatively under the log target).
    Fold-in (`predict_in_context`): (b_i, p_i) is that same closed-form ridge solve (penalty
    lam * n_i) over the source's context pair medians (plus its train pairs if it is a train
    source) against the fitted (c_j, q_j) -- exactly one half-step of ALS for the new row.

    Departures from Koren (Koren, Bell, Volinsky, IEEE Computer 2009, "Matrix factorization
    techniques for recommender systems"): fitted by ALS-WR rather than SGD, with the weighted
    penalty lam * n_i on biases and factors alike; a log target; the matrix entries are pair
    medians; no implicit feedback or temporal dynamics; mu is fixed at the mean target.
    """

    def __init__(self, rank: int = 10, lam: float = 0.05, iters: int = 20, target: str = "log",
                 seed: int = 0):
        if rank < 0 or iters < 1 or lam < 0:
            raise InputError("need rank >= 0, iters >= 1, lam >= 0")
        self.rank, self.lam, self.iters, self.target, self.seed = rank, lam, iters, target, seed

    @staticmethod
    def _solve_side(own, other, t, X_other, n, lam):
        """Ridge-solve [bias, factors] for every node on one side given the other side's
        [1, factors] features: rows grouped by node, one (r+1)x(r+1) system per node."""
        order = np.argsort(own, kind="stable")
        own_s = own[order]
        F = X_other[other[order]]  # (m, r+1): [1, q_j]
        y = t[order]
        k = F.shape[1]
        out = np.zeros((n, k))
        starts = np.flatnonzero(np.r_[True, own_s[1:] != own_s[:-1]])
        ends = np.r_[starts[1:], len(own_s)]
        for s, e in zip(starts, ends, strict=True):
            Fi = F[s:e]
            A = Fi.T @ Fi + lam * (e - s) * np.eye(k)
            out[own_s[s]] = np.linalg.solve(A, Fi.T @ y[s:e])
        return out

    def fit(self, train: Observations) -> BiasedMF:
        i, j, t, n = self._prepare(train)
        rng = np.random.default_rng(self.seed)
        self.mu_ = float(np.mean(t))
        resid = t - self.mu_
        # P, Q hold [bias, factors] per node; the features used against them are [1, factors]
        P = np.zeros((n, self.rank + 1))
        Q = np.zeros((n, self.rank + 1))
        Q[:, 1:] = rng.normal(0, 0.1, (n, self.rank))
        for _ in range(self.iters):
            Xq = np.c_[np.ones(n), Q[:, 1:]]
            P = self._solve_side(i, j, resid - Q[j, 0], Xq, n, self.lam)
            Xp = np.c_[np.ones(n), P[:, 1:]]
            Q = self._solve_side(j, i, resid - P[i, 0], Xp, n, self.lam)
        self.b_, self.c_ = P[:, 0], Q[:, 0]
        self.P_, self.Q_ = P[:, 1:], Q[:, 1:]
        return self

    def _source_params(self, i):
        return np.c_[self.b_[i], self.P_[i]]

    def _predict_target(self, p, j):
        return self.mu_ + p[:, 0] + self.c_[j] + np.sum(p[:, 1:] * self.Q_[j], axis=1)

    def _fold(self, g, j, t, init, cold):
        Xq = np.c_[np.ones(len(self._nodes)), self.Q_]
        return self._solve_side(g, j, t - self.mu_ - self.c_[j], Xq, len(cold), self.lam)
