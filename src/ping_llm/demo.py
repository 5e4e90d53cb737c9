"""`ping-llm demo`: the whole system, end to end, on the embedded synthetic Internet.

synth -> ingest -> prepare -> train (tiny) -> calibrate (on val, val_probe) -> eval (vs baselines
and ground truth) -> queries.

Every stage writes into one run directory and records completion in `DIR/stages.json`; running
the demo again skips what is done (the training stage resumes its checkpoint). `--minutes` is the
wall-time budget of the whole demo: the data stages and the evaluation take a few minutes on two
CPU cores, and training gets most of the rest. Training runs a full learning-rate schedule rather
than being cut off mid-way: its step count is chosen from a short measurement of this machine's
step time, and its schedule also follows the time budget (`TrainConfig.time_budget_s`), so a
machine that slows down later still ends training on time, with the lr decayed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ping_llm.errors import InputError
from ping_llm.options import option

STAGES = ("synth", "ingest", "prepare", "train", "calibrate", "eval", "queries")
# Fixed costs on 2 CPU cores (measured on the default world): everything but training.
OVERHEAD_S = {"synth": 15, "ingest": 10, "prepare": 40, "calibrate": 180, "eval": 150,
              "queries": 15}
# Evals (every steps/5, eval_batches each) and saves cost roughly 15% on top of the steps.
EVAL_SAVE_COST = 1.15
CALIBRATE_QUERIES = 500  # val measurements (at most --eval-queries), each at k = 0, 1, 4, 16, 64
CALIBRATION_STEPS = 6


@dataclass
class DemoConfig:
    """What `ping-llm demo` takes; every field is one of its flags."""

    out: str = option("demo", "run directory", metavar="DIR")
    minutes: float = option(15.0, "wall-time budget of the whole demo; training gets most of it")
    seed: int = option(0, "seed of the world, splits and model")
    probes: int | None = option(None, "probes in the synthetic world (default: as `ping-llm "
                                "synth`)")
    days: float | None = option(None, "days of measurements (default: as `ping-llm synth`)")
    eval_queries: int = option(1000, "evaluated measurements per test split")
    steps: int | None = option(None, "training steps (default: as many as fit the budget)")
    seq_len: int | None = option(None, "model context in tokens (default: the tiny preset's "
                                 "1024); shorter trains faster per token")

    def __post_init__(self):
        if not self.minutes > 0:
            raise InputError(f"--minutes must be positive, got {self.minutes}")
        if self.eval_queries < 10:
            raise InputError(f"eval_queries must be >= 10, got {self.eval_queries}")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"steps must be >= 1, got {self.steps}")
        if self.seq_len is not None and not 64 <= self.seq_len <= 4096:
            raise InputError(f"seq_len must be in [64, 4096], got {self.seq_len}")


class _Stages:
    """stages.json: which stages finished, when, in how long, with what result."""

    def __init__(self, root: Path):
        self.path = root / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}

    def finished(self, name: str) -> bool:
        return name in self.done

    def record(self, name: str, seconds: float, result: dict) -> None:
        self.done[name] = {"seconds": round(seconds, 1), **result}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=2) + "\n")
        tmp.replace(self.path)


def _banner(i: int, name: str, what: str) -> None:
    print(f"\n[{i}/{len(STAGES)}] {name}: {what}", flush=True)


def run_demo(config: DemoConfig | None = None) -> dict:
    """Run (or continue) the demo; returns the stage summaries (also in DIR/stages.json)."""
    from ping_llm import train as tr
    from ping_llm.config import TrainConfig
    from ping_llm.data import ingest, prepare, synth, synth_atlas

    cfg = config or DemoConfig()
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    stages = _Stages(root)
    t_demo = time.perf_counter()
    results_path = root / "synth" / "results.jsonl.gz"
    canonical = root / "canonical"
    dataset = root / "dataset"
    run_dir = root / "run"
    report_dir = root / "report"

    def stage(i: int, name: str, what: str, fn) -> dict:
        _banner(i, name, what)
        if stages.finished(name):
            print("  done already (remove stages.json to redo)")
            return stages.done[name]
        t0 = time.perf_counter()
        result = fn()
        stages.record(name, time.perf_counter() - t0, result)
        print(f"  {name} finished in {time.perf_counter() - t0:.1f} s")
        return stages.done[name]

    def do_synth() -> dict:
        kw = {k: getattr(cfg, k) for k in ("probes", "days") if getattr(cfg, k) is not None}
        results_path.parent.mkdir(parents=True, exist_ok=True)
        s = synth_atlas.generate(synth.SynthConfig(seed=cfg.seed, **kw), results_path)
        return {k: s[k] for k in ("results", "packets", "probes", "servers", "world")}

    def do_ingest() -> dict:
        rep = ingest.ingest([results_path], canonical, progress=True)
        if rep.rejected:
            raise RuntimeError(f"synthetic results were rejected by ingest: {rep.rejects}")
        return {"rows": rep.rows, "failed": rep.failed}

    def do_prepare() -> dict:
        card = prepare.prepare([canonical], dataset, prepare.PrepareConfig(seed=cfg.seed),
                               overwrite=True)
        return {"measurements": card["counts"]["measurements"],
                "splits": {k: v["measurements"] for k, v in card["splits"].items()}}

    def do_train() -> dict:
        spent = time.perf_counter() - t_demo
        budget = cfg.minutes * 60 - spent - sum(OVERHEAD_S[s] for s in STAGES[4:])
        model = {} if cfg.seq_len is None else {"sequence_len": cfg.seq_len}
        base = TrainConfig(data_dir=str(dataset), out_dir=str(run_dir), seed=cfg.seed,
                              model=model, resume=True)
        if base.knowledge:  # the world publishes its own geolocation database
            base = dataclasses.replace(base, geo_db=str(synth.geo_db_path(results_path)))
        steps = cfg.steps or _steps_for_budget(base, max(budget, 30.0))
        print(f"  training the tiny model for {steps} steps (~{max(budget, 30) / 60:.1f} min)")
        # The steps are planned from a few timed ones; if the machine then slows down (other
        # work), the schedule follows the time budget instead and training still ends on time.
        train_cfg = TrainConfig.from_dict({**base.to_dict(), "steps": steps,
                                               "eval_every": max(steps // 5, 1),
                                               "save_every": max(steps // 5, 1),
                                               "time_budget_s": None if cfg.steps
                                               else max(budget, 30.0) / EVAL_SAVE_COST})
        summary = tr.train(train_cfg)
        if not summary["completed"]:
            raise KeyboardInterrupt  # stopped by a signal: checkpoint saved, rerun resumes
        return {k: summary[k] for k in ("step", "final_loss", "final_eval_loss", "tokens_per_s")}

    stage(1, "synth", "generate RIPE-format pings from the synthetic Internet", do_synth)
    stage(2, "ingest", "RIPE Atlas JSON -> canonical Parquet", do_ingest)
    stage(3, "prepare", "splits + probe-centric ArrayRecord rows", do_prepare)
    stage(4, "train", "the tiny Transformer on CPU", do_train)
    stage(5, "calibrate", "fit the distributions' calibration on val and val_probe",
          lambda: _calibrate(dataset, run_dir, cfg))
    stage(6, "eval", "model vs baselines vs ground truth",
          lambda: _evaluate(dataset, run_dir, report_dir, results_path, cfg))
    stage(7, "queries", "ask the model", lambda: _queries(run_dir, dataset, results_path))
    summary = {"out": str(root), "seconds": round(time.perf_counter() - t_demo, 1),
               "stages": stages.done, "report": str(report_dir / "report.html")}
    _print_summary(summary)
    return summary


def _steps_for_budget(base, seconds: float) -> int:
    """Optimizer steps that fit `seconds`, from timing a few steps of the same model here."""
    from ping_llm import train as tr
    from ping_llm.config import TrainConfig

    probe = TrainConfig.from_dict({**base.to_dict(), "out_dir": None, "resume": False,
                                      "steps": CALIBRATION_STEPS, "eval_every": 0,
                                      "log_every": 10**6})
    summary = tr.train(probe)
    tokens_per_step = base.device_batch_size * base.gpt_config().sequence_len
    per_step = tokens_per_step / summary["tokens_per_s"]
    return max(20, int(seconds / (per_step * EVAL_SAVE_COST)))


def _calibrate(dataset: Path, run_dir: Path, cfg: DemoConfig) -> dict:
    from ping_llm.eval.calibrate import calibrate

    s = calibrate(dataset, run_dir, max_queries=min(CALIBRATE_QUERIES, cfg.eval_queries),
                  seed=cfg.seed)
    for name, rows in s["val"].items():
        cov = ", ".join(f"{k} {v['before']['coverage_90']:.2f} -> "
                        f"{v['after']['coverage_90']:.2f}" for k, v in rows.items())
        print(f"  {s['split_of'][name]}, {name}: coverage of the 90% interval, raw -> "
              f"calibrated: {cov}")
    return {"file": s["file"], "val": s["val"]}


def _evaluate(dataset: Path, run_dir: Path, report_dir: Path, results_path: Path,
              cfg: DemoConfig) -> dict:
    """Model vs baselines vs ground truth on every test split; prints the held-out-pair table."""
    from ping_llm.data.synth import world_path
    from ping_llm.eval.evaluate import evaluate
    from ping_llm.eval.report import summary_table

    res = evaluate(dataset, run_dir, report_dir, max_queries=cfg.eval_queries,
                   contexts=(0, 1, 4), seed=cfg.seed, world=world_path(results_path))
    pair = res.splits["test_pair"]
    header, rows = summary_table(pair)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("\n  test_pair (pairs never seen in training), "
          f"{next(iter(pair.methods.values())).get('n', '?')} measurements:")
    for r in [header, *rows]:
        print("    " + "  ".join(str(c).replace("**", "").ljust(w) for c, w in zip(r, widths,
                                                                                    strict=True)))
    headline = {}
    for name in ("model k=0", "model k=4", "global_median", "pair_median", "vivaldi", "dmfsgd"):
        m = pair.methods.get(name)
        if m is not None:  # baselines are reported with the global-median fallback
            headline[name] = m.get("median_ae_ms", m.get("fallback", {}).get("median_ae_ms"))
    return {"report": res.files["html"], "test_pair_median_ae_ms": headline}


def _queries(run_dir: Path, dataset: Path, results_path: Path) -> dict:
    """A few questions a user would ask, answered by the model next to the generator's truth."""
    import numpy as np
    import pyarrow.compute as pc

    from ping_llm.data import synth
    from ping_llm.data.schema import read_canonical
    from ping_llm.query.engine import Engine

    engine = Engine.load(run_dir)
    world = synth.World.load(synth.world_path(results_path))
    # The source with the most held-out destinations, its busiest one (a pair the model never saw
    # in training), and as candidate peers its held-out destinations topped up to five with the
    # most-measured other destinations of the held-out pairs.
    pairs = read_canonical([dataset / "splits" / "test_pair.parquet"])
    pairs = pairs.filter(pc.equal(pairs["ip_version"], 4))
    src_a = pairs["src_addr"].to_numpy(zero_copy_only=False).astype(str)
    dst_a = pairs["dst_addr"].to_numpy(zero_copy_only=False).astype(str)
    uniq = np.unique(np.char.add(np.char.add(src_a, " "), dst_a))
    srcs, n_dst = np.unique([u.split(" ")[0] for u in uniq], return_counts=True)
    src = str(srcs[np.argmax(n_dst)])
    mine = dst_a[src_a == src]
    dsts, counts = np.unique(mine, return_counts=True)
    dsts = [str(d) for d in dsts[np.argsort(-counts, kind="stable")][:5]]
    others, counts = np.unique(dst_a, return_counts=True)
    for d in others[np.argsort(-counts, kind="stable")]:
        if len(dsts) >= 5:
            break
        if str(d) not in dsts:
            dsts.append(str(d))
    mine = pairs.filter(pc.equal(pairs["src_addr"], src))
    when = int(mine["event_time"].to_numpy().max().astype("datetime64[s]").astype(np.int64))
    dst = dsts[0]

    d = engine.rtt(src, dst, time=when)
    truth = world.truth(src, dst, when)
    q = (0.05, 0.5, 0.95)
    tq = truth.quantiles(q)[0]
    print(f"\n  RTT {src} -> {dst} (a pair held out of training), {_utc(when)}:")
    print(f"    {'':8}{'P(fail)':>9}{'p5 ms':>9}{'median':>9}{'p95 ms':>9}")
    print(f"    {'model':8}{d.p_failed:>9.3f}" + "".join(f"{d.quantile(x):>9.1f}" for x in q))
    print(f"    {'truth':8}{float(truth.p_fail[0]):>9.3f}" + "".join(f"{v:>9.1f}" for v in tq))

    prefix = ".".join(dst.split(".")[:3]) + ".0/24"
    p24 = engine.rtt(src, prefix, time=when)
    how = "exact" if p24.exact else f"Monte Carlo, {p24.n_samples} samples"
    print(f"\n  RTT {src} -> {prefix} (marginal over the /24, {how}, "
          f"{p24.n_completions} addresses): median {p24.median:.1f} ms, "
          f"P(fail) {p24.p_failed:.3f}")

    ranked = engine.rank(src, dsts, time=when)
    true_median = {c: float(world.truth(src, c, when).median()[0]) for c in dsts}
    print(f"\n  ranking {len(dsts)} candidate peers for {src} by predicted median:")
    print(f"    {'rank':>4}  {'candidate':<40}{'model ms':>10}{'truth ms':>10}")
    for r in ranked:
        print(f"    {r.rank:>4}  {r.dst:<40}{r.median_ms:>10.1f}{true_median[r.dst]:>10.1f}")
    by_truth = sorted(dsts, key=true_median.get)
    agree = float(np.corrcoef([by_truth.index(r.dst) for r in ranked],
                              list(range(len(ranked))))[0, 1])
    return {"src": src, "dst": dst, "median_ms": d.median, "true_median_ms": float(tq[1]),
            "prefix": prefix, "prefix_median_ms": p24.median, "rank_spearman": round(agree, 3)}


def _utc(epoch_s: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _print_summary(summary: dict) -> None:
    minutes = summary["seconds"] / 60
    print(f"\ndemo finished in {minutes:.1f} min; everything is in {summary['out']}")
    print(f"report: {summary['report']}")
