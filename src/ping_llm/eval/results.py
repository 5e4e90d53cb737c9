"""What `ping-llm eval` returns: typed results, read by attribute by the report and the plots.

`EvalResults` holds the settings, the run, the leak check and one `SetResult` per evaluated set
(a split, or an external set); `to_dict()` is metrics.json (and `eval --json`): every number,
none of the per-query arrays. A `SetResult`'s `methods` maps a method's label ("model k=4",
"vivaldi", "vivaldi k=4", "truth") to its metrics by name (`eval.scoring.summarize`: the
report's columns are those names), and its `plot` keeps the per-query arrays the figures need.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np


@dataclass
class SetPlot:
    """Per-query arrays of one evaluated set, for the figures (not in metrics.json)."""

    obs: np.ndarray  # (N,) observed RTT, ms (NaN where failed)
    failed: np.ndarray  # (N,) bool
    methods: dict = field(default_factory=dict)  # label -> {"median", "p_failed", "pit", ...}
    examples: list = field(default_factory=list)  # example pairs' distributions vs observations


@dataclass
class SetResult:
    """One evaluated set: its queries and every method's scores on them."""

    n_total: int = 0  # measurements in the set
    n_evaluated: int = 0  # the subsample scored
    subsample: dict = field(default_factory=dict)  # how it was drawn
    n_success: int = 0
    n_failed: int = 0
    ip_versions: dict = field(default_factory=dict)  # "4" / "6" -> queries
    methods: dict = field(default_factory=dict)  # label -> metrics by name
    truth_rows: int | None = None  # queries with a ground truth (synthetic data)
    baseline_predict_seconds: float | None = None
    breakdowns: dict = field(default_factory=dict)  # group kind -> group -> method -> metrics
    seconds: float | None = None
    context_pool: str = ""  # where the k context measurements came from
    readdressed_sources: bool = False
    plot: SetPlot | None = None

    def of_kind(self, kind: str) -> dict:
        """The methods of one kind ("model", "baseline", "truth"), label -> metrics."""
        return {n: m for n, m in self.methods.items() if m.get("kind") == kind}

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "plot"
                and not (f.name == "truth_rows" and self.truth_rows is None)}


@dataclass
class Settings:
    """How the evaluation ran."""

    max_queries: int | None = None  # per set; None = all
    contexts: list = field(default_factory=list)  # the k values
    seed: int = 0
    context_from: str = "train"
    splits: list = field(default_factory=list)  # the sets evaluated
    readdress: bool = False
    device: str = "cpu"
    levels: list = field(default_factory=list)  # central-interval levels of the coverage
    pit_bins: int | None = None
    byte2_mass: float | None = None  # the engine's byte2 refinement mass
    censor_ms: float | None = None  # of the censored CRPS
    baseline_crps_levels: int | None = None  # quantiles of a quantile baseline's CRPS ladder
    test_paths: list | None = None  # the external set's files
    test_window: list | None = None  # [since, until] epoch s of the external set


@dataclass
class RunInfo:
    """The run that was evaluated."""

    step: int | None = None
    model: dict = field(default_factory=dict)  # its GPTConfig
    preset: str | None = None
    trainer: dict | None = None  # tokens seen, training time
    calibration: dict | None = None  # what its calibration.json was fitted on (None: raw)
    knowledge: dict | None = None  # the address-knowledge database it reads


@dataclass
class EvalResults:
    """One evaluation of a run: what was asked, of what, and every method's answers' scores."""

    format: str = "ping-llm-eval"
    format_version: int = 1
    ping_llm: str = ""  # the version that evaluated
    created: str = ""  # UTC, ISO 8601
    data_dir: str = ""
    run_dir: str = ""
    dataset: dict = field(default_factory=dict)  # fingerprints and counts from the card
    run: RunInfo = field(default_factory=RunInfo)
    settings: Settings = field(default_factory=Settings)
    leak_check: dict = field(default_factory=dict)  # `eval.leakcheck.check_leak`
    synthetic: dict | None = None  # the world of a synthetic dataset (KL to the truth)
    synthetic_note: str | None = None  # why there is no KL although the data is synthetic
    baselines: dict = field(default_factory=dict)  # fit time, train size, geolocation database
    splits: dict = field(default_factory=dict)  # set name -> SetResult
    external: dict | None = None  # an external set: how much of it train has seen
    learning_curve: dict | None = None  # kept checkpoints on the same queries
    timings: dict = field(default_factory=dict)  # stage -> seconds
    files: dict | None = None  # the report's files, once written

    def to_dict(self) -> dict:
        """Every number (metrics.json, `eval --json`); the per-query arrays stay out."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("external", "files") and v is None:
                continue
            if f.name in ("run", "settings"):
                v = {g.name: getattr(v, g.name) for g in fields(v)}
            elif f.name == "splits":
                v = {name: s.to_dict() for name, s in v.items()}
            out[f.name] = v
        return out
