"""The evaluation report: metrics.json (every number), summary.md (tables) and report.html (tables
and plots, self-contained: PNGs embedded as base64, no scripts, no network).

`write_report(results, out_dir)` renders what `ping_llm.eval.evaluate.evaluate` returns. Plots are
matplotlib (`ping_llm.eval.plots`): CDFs of absolute and relative error per method, error vs number
of context measurements, PIT histograms and interval coverage, reliability of P(failed), example
RTT distributions against the observed histogram (and the truth on synthetic data), token NLL per
field, and KL(true || model) on synthetic data. Tables show, per evaluated set, every method on
all queries (baselines with the global-median fallback) and each baseline on the queries it
covers ("[covered]").
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from ping_llm.eval.plots import (
    fig_calibration,
    fig_context,
    fig_error_cdfs,
    fig_examples,
    fig_kl,
    fig_learning_curve,
    fig_nll,
    fig_reliability,
)
from ping_llm.eval.results import EvalResults, SetResult

# summary table: (header, where the number is in a method's metrics, kind of number)
COLUMNS = (
    ("n", "n", "int"),
    ("coverage", "coverage", "frac"),
    ("MAE ms", "mae_ms", "ms"),
    ("median AE ms", "median_ae_ms", "ms"),
    ("rel p50", "rel_p50", "frac"),
    ("rel p90", "rel_p90", "frac"),
    ("CRPS ms", "crps_ms", "ms"),
    ("CRPS≤10s ms", "crps_cens_ms", "ms"),
    ("cov 50%", "coverage_50", "frac"),
    ("cov 90%", "coverage_90", "frac"),
    ("ROC-AUC", "roc_auc", "frac"),
    ("PR-AUC", "pr_auc", "frac"),
    ("log P(result)", "logp_result", "nats"),
)


def fmt(value, kind: str = "ms") -> str:
    """A number as shown in the tables ("–" for missing / NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if kind == "int":
        return f"{int(value)}"
    if kind == "frac":
        return f"{value:.3f}"
    a = abs(value)
    if a >= 100:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def json_safe(obj):
    """numpy scalars/arrays -> Python, NaN/inf -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def table_rows(split: SetResult) -> list[tuple[str, dict]]:
    """(row label, metrics) of a split's summary table: models, truth, baselines with fallback,
    then baselines on their covered queries."""
    rows, covered = [], []
    for name, m in split.methods.items():
        if m.get("kind") == "baseline":
            rows.append((name, {**m["fallback"], "coverage": m["coverage"]}))
            covered.append((f"{name} [covered]", {**m["covered"], "coverage": m["coverage"]}))
        else:
            rows.append((name, {**m, "coverage": m.get("coverage", 1.0)}))
    return rows + covered


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def summary_table(split: SetResult) -> tuple[list[str], list[list[str]]]:
    header = ["method"] + [c[0] for c in COLUMNS]
    rows = table_rows(split)
    full = [m.get("median_ae_ms") for name, m in rows if "[covered]" not in name
            and m.get("median_ae_ms") is not None and math.isfinite(m["median_ae_ms"])
            and name != "truth"]
    best = min(full) if full else None
    body = []
    for name, m in rows:
        cells = [fmt(m.get(key), kind) for _, key, kind in COLUMNS]
        if best is not None and "[covered]" not in name and name != "truth" \
                and m.get("median_ae_ms") == best:
            cells[3] = f"**{cells[3]}**"
        body.append([name] + cells)
    return header, body


def _ablation_table(split: SetResult) -> tuple[list[str], list[list[str]]]:
    header = ["context k", "context used (mean)", "log P(result) with time",
              "without time", "gain (nats)", "log P(RTT) with time", "without time"]
    body = []
    for m in split.of_kind("model").values():
        a = m["timestamp_ablation"]
        body.append([str(m["context"]), fmt(m["context_mean"], "frac"),
                     fmt(a["logp_result_with_time"], "nats"),
                     fmt(a["logp_result_without_time"], "nats"), fmt(a["gain_nats"], "nats"),
                     fmt(a["logp_rtt_with_time"], "nats"), fmt(a["logp_rtt_without_time"], "nats")])
    return header, body


def _nll_table(split: SetResult) -> tuple[list[str], list[list[str]]]:
    fields = ("start", "src", "dst", "time", "result")
    header = ["context k"] + [f"NLL {f} (nats)" for f in fields] + ["total"]
    body = []
    for m in split.of_kind("model").values():
        pf = m["nll"]["per_field"]
        body.append([str(m["context"])] + [fmt(pf.get(f), "nats") for f in fields]
                    + [fmt(m["nll"]["total"], "nats")])
    return header, body


def _kl_table(split: SetResult) -> tuple[list[str], list[list[str]]] | None:
    body = []
    for m in split.of_kind("model").values():
        if "kl" in m:
            k = m["kl"]
            body.append([str(m["context"])] + [fmt(k[x][s], "nats") for x in
                                               ("kl_rtt", "kl_byte1", "kl_full")
                                               for s in ("mean", "median")])
    if not body:
        return None
    header = ["context k", "KL RTT codes mean", "median", "KL byte1 bins mean", "median",
              "KL incl. failure mean", "median"]
    return header, body


def _breakdown_table(split: SetResult, kind: str) -> tuple[list[str], list[list[str]]]:
    cells = split.breakdowns[kind]
    labels = list(cells)
    header = ["method"] + [f"{lab} (n)" for lab in labels]
    methods = list(next(iter(cells.values()))) if cells else []
    body = []
    for name in methods:
        row = [name]
        for lab in labels:
            m = cells[lab][name]
            row.append(f"{fmt(m['median_ae_ms'])} ({m['n_success']})")
        body.append(row)
    return header, body


def _header_md(results: EvalResults) -> list[str]:
    s, run = results.settings, results.run
    lines = [f"# ping-llm evaluation ({results.created})", "",
             f"- dataset: `{results.data_dir}`; run: `{results.run_dir}` "
             f"(step {run.step}, preset {run.preset})",
             f"- leak check: {results.leak_check['mode']}; dataset train fingerprint "
             f"`{results.leak_check['dataset_train_fingerprint']}`",
             f"- queries per set: at most {s.max_queries} (seed {s.seed}); contexts "
             f"{s.contexts}; device {s.device}; total {results.timings['total_s']} s"]
    if s.readdress:
        lines.append("- sources re-addressed: every evaluated source is asked about under a new "
                     "random address, with its train measurements to other destinations as "
                     "context (cold start on known probes)")
    cal = run.calibration
    cold = cal.get("val_probe") if cal else None  # None: fitted on val alone
    lines.append("- model distributions: raw (no calibration.json, or --no-calibration)"
                 if not cal else
                 f"- model distributions: calibrated on {cal.get('split')} "
                 f"({cal.get('queries')} queries"
                 + (f", val_probe {cold['queries']} queries" if cold else "")
                 + f" x k={cal.get('contexts')}, step {cal.get('step')}); token NLL is the raw "
                 "model's")
    model = run.model or {}
    if model.get("prefix_buckets") or model.get("knowledge_dim"):
        know = run.knowledge or {}
        lines.append("- the model reads " + " and ".join(
            ([f"prefix memory ({model['prefix_buckets']} rows per level)"]
             if model.get("prefix_buckets") else [])
            + ([f"address knowledge from {know.get('name')} built {know.get('build_date')}"]
               if model.get("knowledge_dim") else [])))
    if results.synthetic:
        lines.append(f"- synthetic world: `{results.synthetic['world_file']}` (fingerprint "
                     f"{results.synthetic['fingerprint']}): KL and the truth row are exact")
    inv = results.leak_check.get("split_invariants")
    if inv:
        lines.append("- split invariants on the data: " + ", ".join(
            f"{k} {v}" for k, v in inv["checked"].items()))
    if s.test_paths:
        lo, hi = s.test_window or (None, None)
        window = "" if lo is None and hi is None else f", time window [{lo}, {hi}) epoch s"
        lines.append(f"- external set: `{', '.join(s.test_paths)}`{window}; context from "
                     f"{s.context_from}")
    geo = results.baselines.get("geo_db")
    if geo:
        lines.append(f"- geolocation baseline: {geo['name']} built {geo['build_date']} "
                     f"(sha256 `{geo['sha256'][:16]}…`)" + (
                         f", {geo['licence']}. {geo['attribution']}" if geo.get("licence")
                         else ""))
    if results.external:
        seen = results.external["seen_in_train"]
        lines.append("- external set seen in train: " + ", ".join(
            f"{k} {v['distinct_seen']}/{v['distinct']} distinct, "
            f"{100 * v['measurements_seen_frac']:.1f}% of measurements" for k, v in seen.items()))
    lines += ["", "Errors of the predicted median on successful pings (ms); CRPS in ms; coverage "
              "of the central 50%/90% intervals; ROC/PR-AUC of P(failed); mean log P of the "
              "observed result (nats). Baselines: first with the global-median fallback on "
              "every query, then `[covered]` on the queries they can answer. Bold: lowest "
              "median AE over all queries.", ""]
    return lines


def verdict(split: SetResult) -> str:
    """One sentence: the model's best context setting against the best baseline (median AE over
    all queries, baselines with their fallback)."""
    def med(m):
        v = m.get("fallback", m).get("median_ae_ms")
        return v if v is not None and math.isfinite(v) else math.inf

    models, base = split.of_kind("model"), split.of_kind("baseline")
    if not models or not base:
        return ""
    bm = min(models, key=lambda n: med(models[n]))
    bb = min(base, key=lambda n: med(base[n]))
    a, b = med(models[bm]), med(base[bb])
    if not (math.isfinite(a) and math.isfinite(b)):
        return ""
    how = "beats" if a < b else "loses to" if a > b else "ties"
    ratio = f"; error ratio model / baseline {a / b:.2f}" if b > 0 else ""
    return (f"Best model setting {bm} (median AE {fmt(a)} ms) {how} the best baseline {bb} "
            f"({fmt(b)} ms{ratio}).")


DEFINITIONS = """## Definitions

- Queries: a seeded uniform subsample (without replacement) of each evaluated set; failed pings
  stay in and score P(failed); RTT metrics are over the successful ones.
- Context k: the k most recent measurements of the query's source strictly before its time, from
  train; for test_probe and val_probe (probes never in train) and with `--context-from test`,
  the source's own earlier measurements in the evaluated set to other destinations. Fewer are
  used when fewer exist ("context used"), and long contexts are cut to what fits the model's
  window. With such a cold context, every baseline that can read it gets the same k
  ("<baseline> k=K": Vivaldi updates of the new node, MF / DMFSGD fold-in, source offset,
  geo + residual, per-source failure rate); elsewhere the baselines already fit the source on train.
- Point error: the median of the predicted distribution given a reply; relative error
  |pred - obs| / obs.
- CRPS: of the full predictive distribution (model: exact pmf on the RTT code grid; quantile
  baselines: a 40-quantile ladder; point baselines: a point mass, CRPS = absolute error);
  "CRPS≤10s": forecast and observation censored at 10 s, so far-tail mass does not dominate.
- Coverage: share of observations inside the central 50% / 90% interval (observations snapped to
  the RTT code grid for the model). PIT: the predictive CDF at the observation (randomised for
  ties); flat when calibrated.
- log P(result): mean log-probability of the observed result (the RTT code, or FAILED) given src,
  dst, time and context, in nats (model and truth only). Timestamp ablation: the same without the
  query's timestamp.
- KL(true || model) (synthetic data): over the RTT codes given a reply, over the byte1 bins, and
  over {failed} + codes, in nats, against the generator's exact law.
- Baselines and their departures from the papers: Vivaldi is Serf's variant (height, adjustment,
  gravity, latency filter; fitted by replaying train in time order), not Dabek et al.'s plain
  update; DMFSGD (Liao et al. 2013) factorises log(1 + RTT) with non-negative factors in a
  centralised batched simulation of the node updates (the paper: RTT itself, decentralised);
  biased MF (Koren et al. 2009) is alternating ridge on per-pair medians of log RTT, without time
  effects; geo fits the train split's own distance-to-RTT curve (median per distance bin) rather
  than Htrae's coordinates; source offset and the per-source failure rate are our own simple
  references. Point-only baselines have CRPS = absolute error and no intervals.
"""


def summary_markdown(results: EvalResults) -> str:
    lines = _header_md(results)
    for name, split in results.splits.items():
        lines += [f"## {name}: {split.n_evaluated} of {split.n_total} measurements "
                  f"({split.n_failed} failed)", ""]
        lines += [_md_table(*summary_table(split)), ""]
        v = verdict(split)
        if v:
            lines += [v, ""]
        lines += ["Timestamp ablation and context:", "", _md_table(*_ablation_table(split)), ""]
        kl = _kl_table(split)
        if kl:
            lines += ["KL(true || model), nats:", "", _md_table(*kl), ""]
    return "\n".join(lines) + "\n" + DEFINITIONS


# ----------------------------------------------------------------------------------------------
# HTML and the entry point

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0 1.2em}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f4f6f8}td:first-child,th:first-child{text-align:left}
tr.model td{background:#eef4fb}tr.truth td{background:#f3f3f3}tr.covered td{color:#666}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
.note{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 .2em}
"""


def _html_table(header, rows, classes=None) -> str:
    def cell(c):
        c = html.escape(c)
        return f"<b>{c[2:-2]}</b>" if c.startswith("**") and c.endswith("**") else c

    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>")
    return "\n".join(out + ["</table>"])


def _img(b64: str | None, alt: str) -> str:
    if not b64:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _md_inline(text: str) -> str:
    """The header bullet lines of summary.md as HTML (escape, `code`)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def report_html(results: EvalResults) -> str:
    head = _header_md(results)
    body = [f"<h1>{html.escape(head[0][2:])}</h1>", "<ul>"]
    body += [f"<li>{_md_inline(line[2:])}</li>" for line in head[1:] if line.startswith("- ")]
    body += ["</ul>", f'<p class="note">{_md_inline(head[-2])}</p>']
    body += ["<h2>Error vs context</h2>", _img(fig_context(results), "error vs context")]
    for name, split in results.splits.items():
        body.append(f"<h2>{html.escape(name)}: {split.n_evaluated} of {split.n_total} "
                    f"measurements ({split.n_failed} failed)</h2>")
        header, rows = summary_table(split)
        classes = ["covered" if "[covered]" in r[0] else "model" if r[0].startswith("model")
                   else "truth" if r[0] == "truth" else "" for r in rows]
        body.append(_html_table(header, rows, classes))
        v = verdict(split)
        if v:
            body.append(f"<p><b>{html.escape(v)}</b></p>")
        body.append(f'<p class="note">context pool: {html.escape(split.context_pool)}'
                    "</p>")
        body.append(_img(fig_error_cdfs(name, split.plot), f"{name} errors"))
        body += ["<h3>Timestamp ablation</h3>", _html_table(*_ablation_table(split))]
        body += ["<h3>Token NLL per field</h3>", _html_table(*_nll_table(split))]
        kl = _kl_table(split)
        if kl:
            body += ["<h3>KL(true ‖ model)</h3>", _html_table(*kl)]
        for kind in split.breakdowns:
            body += [f"<h3>Median abs error (ms) by {kind.replace('_', ' ')}</h3>",
                     _html_table(*_breakdown_table(split, kind))]
    body += ["<h2>Calibration</h2>", _img(fig_calibration(results), "calibration"),
             _img(fig_reliability(results), "reliability of P(failed)")]
    ex = fig_examples(results)
    if ex:
        body += ["<h2>Example RTT distributions</h2>",
                 '<p class="note">Model (and truth) averaged over up to 16 of the pair\'s '
                 "measurement times; grey bars: the observed RTTs in the same byte1 bins.</p>",
                 _img(ex, "examples")]
    body += ["<h2>Token NLL</h2>", _img(fig_nll(results), "nll")]
    kl = fig_kl(results)
    if kl:
        body += ["<h2>KL to the truth</h2>", _img(kl, "kl")]
    curve = fig_learning_curve(results)
    if curve:
        lc = results.learning_curve
        body += ["<h2>Learning curve</h2>",
                 f'<p class="note">The run\'s kept checkpoints (train --keep-every), each on the '
                 f"same {lc['queries_per_set']} queries per set, without context and without "
                 "calibration.</p>", _img(curve, "learning curve")]
    body += ["<h2>Definitions</h2>", "<ul>"]
    for item in DEFINITIONS.split("\n- ")[1:]:
        body.append(f"<li>{html.escape(' '.join(item.split()))}</li>")
    body += ["</ul>"]
    body += ["<h2>Timings (s)</h2>", _html_table(
        ["stage", "seconds"], [[k, str(v)] for k, v in results.timings.items()])]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>ping-llm evaluation</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(results: EvalResults, out_dir) -> dict:
    """Write metrics.json, summary.md and report.html into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    numbers = {k: v for k, v in results.to_dict().items() if k != "files"}
    paths = {"metrics": out / "metrics.json", "summary": out / "summary.md",
             "html": out / "report.html"}
    text = json.dumps(json_safe(numbers), indent=1, allow_nan=False)
    paths["metrics"].write_text(text + "\n")
    paths["summary"].write_text(summary_markdown(results))
    paths["html"].write_text(report_html(results))
    return {k: str(v) for k, v in paths.items()}
