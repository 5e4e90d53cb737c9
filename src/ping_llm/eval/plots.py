"""The plots of the evaluation report (matplotlib, Agg backend; each figure -> base64 PNG).

One function per figure, each reading an `eval.results.EvalResults` (and its sets' `plot`): CDFs of
absolute and relative error per method (`fig_error_cdfs`), error vs number of context
measurements (`fig_context`), PIT histograms and interval coverage (`fig_calibration`),
reliability of P(failed) (`fig_reliability`), example RTT distributions against the observed
histogram and the truth (`fig_examples`), token NLL per field (`fig_nll`) and KL(true || model)
on synthetic data (`fig_kl`). Models are drawn in shades of blue, the truth black dashed.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from ping_llm.eval.results import EvalResults, SetPlot


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False,
                         "font.size": 9, "legend.fontsize": 7.5, "legend.frameon": False})
    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _styles(names: list[str]) -> dict:
    """Models: shades of blue, thick; truth: black dashed; baselines: other colours, thin."""
    import matplotlib

    models = [n for n in names if n.startswith("model")]
    base = [n for n in names if not n.startswith("model") and n != "truth"]
    out = {}
    for i, n in enumerate(models):
        c = matplotlib.colormaps["Blues"](0.45 + 0.55 * i / max(len(models) - 1, 1))
        out[n] = dict(color=c, lw=2.2, ls="-")
    cmap = matplotlib.colormaps["tab10"]
    for i, n in enumerate(base):
        out[n] = dict(color=cmap((i + 1) % 10), lw=1.1, ls=("-", "--", ":", "-.")[i // 9 % 4])
    out["truth"] = dict(color="black", lw=1.6, ls="--")
    return out


def _cdf(ax, x, **kw):
    x = np.sort(np.asarray(x, dtype=np.float64))
    x = x[np.isfinite(x)]
    if len(x):
        ax.plot(np.maximum(x, 1e-3), np.arange(1, len(x) + 1) / len(x), **kw)


def fig_error_cdfs(name: str, plot: SetPlot) -> str:
    plt = _plt()
    ok = ~plot.failed
    y = plot.obs[ok]
    names = [n for n, m in plot.methods.items() if not m.get("context")]  # k rows: fig_context
    sty = _styles(names)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for n in names:
        med = plot.methods[n]["median"][ok]
        sel = np.isfinite(med)
        if not sel.any():
            continue
        err = np.abs(med[sel] - y[sel])
        _cdf(axes[0], err, label=n, **sty[n])
        _cdf(axes[1], err / np.maximum(y[sel], 1e-3), label=n, **sty[n])
    axes[0].set(xscale="log", xlabel="absolute error of the predicted median (ms)",
                ylabel="fraction of successful pings", title=f"{name}: absolute error CDF")
    axes[1].set(xscale="log", xlabel="relative error |pred - obs| / obs",
                title=f"{name}: relative error CDF")
    for ax in axes:
        ax.set_ylim(0, 1)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def fig_context(results: EvalResults) -> str:
    """The in-context curve: per evaluated set, median abs error and censored CRPS against the
    number of context measurements k, for the model and for every baseline that read the same k
    (k = 0: its plain prediction); the best plain baseline dashed."""
    plt = _plt()
    splits = list(results.splits.items())
    fig, axes = plt.subplots(2, max(len(splits), 1), figsize=(4.4 * max(len(splits), 1), 6.4),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    for col, (name, split) in enumerate(splits):
        methods = split.methods
        curves = {"model": sorted((m["context"], m) for m in split.of_kind("model").values())}
        for label, m in methods.items():
            if m.get("kind") == "baseline" and " k=" in label and not m.get("p_failed_only"):
                base = label.rsplit(" k=", 1)[0]
                start = [(0, methods[base])] if base in methods else []  # context-only: none
                curves.setdefault(base, start).append((m["context"], m))
        ks = sorted({k for c in curves.values() for k, _ in c})
        pos = {k: i for i, k in enumerate(ks)}
        plain = {n: m["fallback"] for n, m in methods.items()
                 if m.get("kind") == "baseline" and " k=" not in n and not m.get("p_failed_only")}
        for row, key in enumerate(("median_ae_ms", "crps_cens_ms")):
            ax = axes[row, col]
            for i, (cname, pts) in enumerate(curves.items()):
                pts = sorted(pts, key=lambda p: p[0])
                ys = [m.get("fallback", m).get(key) for _, m in pts]
                ax.plot([pos[k] for k, _ in pts], [np.nan if y is None else y for y in ys],
                        "o-" if cname == "model" else ".--", color="C0" if cname == "model"
                        else cmap((i + 1) % 10), lw=2 if cname == "model" else 1, label=cname)
            best = min(plain, key=lambda n, key=key: _finite_or_inf(plain[n].get(key)),
                       default=None)
            if best is not None and math.isfinite(_finite_or_inf(plain[best].get(key))):
                ax.axhline(plain[best][key], color="grey", ls=":", lw=1,
                           label=f"best plain baseline ({best})")
            ax.set_xticks(range(len(ks)), [str(k) for k in ks])
            ax.set(yscale="log", xlabel="context measurements k",
                   ylabel="median abs error (ms)" if row == 0 else "CRPS, censored at 10 s (ms)",
                   title=name if row == 0 else None)
            _log_ticks(ax.yaxis)
            ax.legend(loc="best")
    fig.tight_layout()
    return _png(fig)


def _log_ticks(axis) -> None:
    """Readable log-axis ticks as plain numbers (1, 2, 5 per decade on short ranges), no minor
    labels. Call after plotting (it reads the axis range)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    short = lo > 0 and math.log10(hi / lo) <= 2.5
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if short else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _finite_or_inf(v) -> float:
    return v if v is not None and math.isfinite(v) else math.inf


def fig_calibration(results: EvalResults) -> str:
    plt = _plt()
    splits = list(results.splits)
    fig, axes = plt.subplots(len(splits), 2, figsize=(11, 3.2 * len(splits)), squeeze=False)
    for r, name in enumerate(splits):
        split = results.splits[name]
        plot = split.plot
        ok = ~plot.failed
        sty = _styles(list(plot.methods))
        ax = axes[r, 0]
        edges = np.linspace(0, 1, 11)
        for n, m in plot.methods.items():
            pit = m.get("pit")
            if pit is None:
                continue
            u = pit[ok][np.isfinite(pit[ok])]
            if len(u):
                dens, _ = np.histogram(u, bins=edges)
                ax.stairs(dens / len(u) * 10, edges, label=n, color=sty[n]["color"],
                          lw=sty[n]["lw"], ls=sty[n]["ls"])
        ax.axhline(1, color="grey", lw=0.8)
        ax.set(xlabel="PIT of the observed RTT", ylabel="density",
               title=f"{name}: PIT histogram (flat = calibrated; U = overconfident)")
        ax.legend(ncol=2)
        ax = axes[r, 1]
        rows = list(split.methods.items())
        labels, c50, c90 = [], [], []
        for n, m in rows:
            mm = m["fallback"] if m.get("kind") == "baseline" else m
            if mm.get("coverage_50") is None:
                continue
            labels.append(n)
            c50.append(mm["coverage_50"])
            c90.append(mm["coverage_90"])
        y = np.arange(len(labels))
        ax.barh(y - 0.2, c50, 0.4, label="50% interval", color="#6baed6")
        ax.barh(y + 0.2, c90, 0.4, label="90% interval", color="#08519c")
        ax.axvline(0.5, color="#6baed6", ls="--")
        ax.axvline(0.9, color="#08519c", ls="--")
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel="coverage of central intervals (dashed: nominal)",
               title=f"{name}: interval coverage")
        ax.legend(loc="lower right")
    fig.tight_layout()
    return _png(fig)


def _reliability(p, y, bins=10):
    p, y = np.asarray(p, float), np.asarray(y, float)
    sel = np.isfinite(p)
    p, y = p[sel], y[sel]
    if len(p) == 0:
        return None
    order = np.argsort(p, kind="stable")
    parts = [g for g in np.array_split(order, min(bins, len(p))) if len(g)]
    return (np.array([p[g].mean() for g in parts]), np.array([y[g].mean() for g in parts]),
            np.array([len(g) for g in parts]))


def fig_reliability(results: EvalResults) -> str:
    """Equal-count bins of predicted P(failed): mean prediction vs observed failure rate, with
    binomial standard errors; on the diagonal when calibrated."""
    plt = _plt()
    splits = list(results.splits)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 4), squeeze=False)
    for i, name in enumerate(splits):
        plot = results.splits[name].plot
        ax = axes[0, i]
        y = plot.failed.astype(float)
        models = [n for n in plot.methods if n.startswith("model")]
        show = {models[0], models[-1], "truth", "pair_median"} if models else {"truth"}
        sty = _styles(list(plot.methods))
        top = 0.05
        for n, m in plot.methods.items():
            pf = m.get("p_failed")
            if pf is None or n not in show:
                continue
            rel = _reliability(pf, y, bins=int(np.clip(len(y) // 100, 5, 10)))
            if rel is None:
                continue
            se = np.sqrt(np.maximum(rel[1] * (1 - rel[1]), 1e-12) / rel[2])
            ax.errorbar(rel[0], rel[1], yerr=se, marker="o", ms=3.5, capsize=2, label=n,
                        color=sty[n]["color"], ls=sty[n]["ls"], lw=min(sty[n]["lw"], 1.6))
            top = max(top, float(np.max(rel[0])), float(np.max(rel[1] + se)))
        top = min(1.0, 1.1 * top)
        ax.plot([0, top], [0, top], color="grey", lw=0.8)
        ax.set(xlim=(0, top), ylim=(0, top), xlabel="predicted P(failed), bin mean",
               ylabel="observed failure rate (± 1 s.e.)",
               title=f"{name}: reliability of P(failed)")
        ax.set_aspect("equal")
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def fig_examples(results: EvalResults) -> str | None:
    from ping_llm import tokens as tk

    plt = _plt()
    exs = [(name, ex) for name, s in results.splits.items() for ex in s.plot.examples]
    if not exs:
        return None
    edges = tk.byte1_bin_edges_ms()
    b1 = np.flatnonzero(np.isfinite(edges[:, 0]))
    lo, hi = np.maximum(edges[b1, 0], 1e-3), edges[b1, 1]  # the first bin starts at 0 ms
    ncol = min(3, len(exs))
    nrow = math.ceil(len(exs) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 3.3 * nrow), squeeze=False)
    for ax, (name, ex) in zip(axes.ravel(), exs, strict=False):
        rtt = np.asarray(ex["rtt"])
        codes = tk.rtt_to_code(rtt).astype(np.int64) >> 8
        obs = np.array([(codes == b).mean() for b in b1])
        # x range: the observed bins and the central 98% of each predicted distribution, at most
        # 10 octaves (4 bins each) beyond the observations
        seen = np.flatnonzero(obs > 0)
        idx = list(seen)
        for m in list(ex["model"].values()) + ([ex["truth"]] if ex.get("truth") else []):
            c = np.cumsum(m["p_byte1"]) / max(np.sum(m["p_byte1"]), 1e-300)
            idx += [int(np.searchsorted(c, 0.01)), int(np.searchsorted(c, 0.99))]
        a, b = max(min(idx) - 2, 0), min(max(idx) + 3, len(b1))
        if len(seen):
            a, b = max(a, seen[0] - 40), min(b, seen[-1] + 41)
        ax.stairs(obs[a:b], np.r_[lo[a:b], hi[b - 1]], fill=True, color="#cccccc",
                  label=f"observed (n={len(rtt)})")
        for j, (k, m) in enumerate(sorted(ex["model"].items(), key=lambda kv: int(kv[0]))):
            p = np.asarray(m["p_byte1"])
            ax.stairs(p[a:b], np.r_[lo[a:b], hi[b - 1]], color=("#2171b5", "#08306b")[j % 2],
                      lw=1.6, label=f"model k={k} (P(fail) {m['p_failed']:.2f})")
        if ex.get("truth"):
            p = np.asarray(ex["truth"]["p_byte1"])
            ax.stairs(p[a:b], np.r_[lo[a:b], hi[b - 1]], color="black", ls="--", lw=1.2,
                      label=f"truth (P(fail) {ex['truth']['p_failed']:.2f})")
        ax.set_xscale("log")
        _log_ticks(ax.xaxis)
        ax.set(xlabel="RTT (ms, log; byte1 bins)", ylabel="probability per bin",
               title=f"{name}: {ex['src']} → {ex['dst']}\nobserved failed "
                     f"{ex['failed_frac']:.2f}", )
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6.5)
    for ax in axes.ravel()[len(exs):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def fig_nll(results: EvalResults) -> str:
    plt = _plt()
    splits = list(results.splits)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.6), squeeze=False)
    fields = ("start", "src", "dst", "time", "result")
    for i, name in enumerate(splits):
        ax = axes[0, i]
        ms = list(results.splits[name].of_kind("model").values())
        w = 0.8 / max(len(ms), 1)
        for j, m in enumerate(ms):
            vals = [m["nll"]["per_field"].get(f, np.nan) for f in fields]
            vals = [np.nan if v is None else v for v in vals]
            c = plt.get_cmap("Blues")(0.4 + 0.6 * j / max(len(ms) - 1, 1))
            ax.bar(np.arange(len(fields)) + (j - (len(ms) - 1) / 2) * w, vals, w, color=c,
                   label=f"k={m['context']}")
        ax.set_xticks(np.arange(len(fields)), fields)
        ax.set(ylabel="NLL per field (nats)", title=f"{name}: token NLL by field")
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def fig_kl(results: EvalResults) -> str | None:
    plt = _plt()
    splits = [n for n, s in results.splits.items() if any("kl" in m for m in s.methods.values())]
    if not splits:
        return None
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.6), squeeze=False)
    for i, name in enumerate(splits):
        ax = axes[0, i]
        plot = results.splits[name].plot
        sty = _styles(list(plot.methods))
        for n, m in plot.methods.items():
            if "kl_rtt" in m and n.startswith("model"):
                _cdf(ax, m["kl_rtt"], label=n, **sty[n])
        ax.set(xscale="log", xlabel="KL(true || model), RTT codes given a reply (nats)",
               ylabel="fraction of queries", ylim=(0, 1), title=f"{name}: KL to the truth")
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def fig_learning_curve(results: EvalResults) -> str | None:
    """Median AE and CRPS (k = 0, raw) per evaluated set against the tokens seen."""
    curve = results.learning_curve
    if not curve:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(dict.fromkeys(p["set"] for p in curve["points"]))
    for name in names:
        pts = sorted((p for p in curve["points"] if p["set"] == name),
                     key=lambda p: p["tokens_seen"])
        tokens = [p["tokens_seen"] / 1e6 for p in pts]
        for ax, key in zip(axes, ("median_ae_ms", "crps_ms"), strict=True):
            ax.plot(tokens, [p[key] for p in pts], marker="o", label=name)
    for ax, what in zip(axes, ("median abs error (ms)", "CRPS, censored at 10 s (ms)"),
                        strict=True):
        ax.set(xlabel="tokens seen (millions)", ylabel=what, yscale="log",
               title=f"{what.split(' (')[0]} during training (k=0)")
        ax.legend()
    fig.tight_layout()
    return _png(fig)
