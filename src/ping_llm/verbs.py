"""What each `ping-llm` verb does: call the library with the parsed arguments, print the result
(plain text, or JSON with --json) and return the exit status.

The flags themselves are in `ping_llm.cli`, which also maps errors to exit statuses. Imports of
heavy modules happen inside the verbs so that `ping-llm --help` stays quick.
"""

from __future__ import annotations

import json
import sys

from ping_llm import __version__
from ping_llm.errors import InputError
from ping_llm.options import given

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3  # their meaning: ping_llm.cli


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


def cmd_version(args) -> int:
    import numpy
    import torch

    info = {"ping_llm": __version__, "torch": torch.__version__, "numpy": numpy.__version__}
    if args.json:
        _print_json(info)
    else:
        print(f"ping-llm {__version__} (torch {torch.__version__}, numpy {numpy.__version__})")
    return EXIT_OK


def cmd_tokens(args) -> int:
    from ping_llm import tokens

    if args.encode:
        m = tokens.Measurement(
            src=args.encode[0],
            dst=args.encode[1],
            rtt_ms=float(args.encode[2]),
            time=None if args.time is None else int(args.time),
        )
        ids = tokens.encode_reference([m])
        out = {"tokens": ids, "names": [tokens.token_name(i) for i in ids]}
    else:
        ids = [int(x) for x in args.decode]
        out = {"measurements": [m.to_dict() for m in tokens.decode(ids)]}
    if args.json:
        _print_json(out)
    elif "names" in out:
        print(" ".join(out["names"]))
    else:
        for m in out["measurements"]:
            print(m)
    return EXIT_OK


def cmd_ingest(args) -> int:
    from ping_llm.data import ingest

    rep = ingest.ingest(
        args.inputs,
        args.out,
        source_address=args.source_address,
        workers=args.workers,
        rejects=args.rejects,
        progress=not args.no_progress,
    )
    if args.json:
        _print_json(rep.to_dict())
    else:
        print(
            f"{len(rep.inputs)} input(s) ({len(rep.skipped_inputs)} already ingested), "
            f"{rep.results:,} results -> {rep.rows:,} rows ({rep.replies:,} replies, "
            f"{rep.failed:,} failed of which {rep.errors:,} errors) in {rep.seconds:.1f} s"
        )
        print(f"  skipped replies: {rep.dups:,} dup, {rep.late:,} late; "
              f"results without rows: {rep.skipped or 'none'}")
        print(f"  rejected: {rep.rejected:,} {rep.rejects or ''}")
        if rep.rejected:
            where = args.rejects or f"{args.out}/_rejects/"
            print(f"  reject records: {where}")
    return EXIT_REJECTED if rep.rejected else EXIT_OK


def cmd_synth(args) -> int:
    import datetime as dt

    from ping_llm.data import synth, synth_atlas

    kw = {k: getattr(args, k) for k in ("seed", "probes", "days") if getattr(args, k) is not None}
    if args.start is not None:
        try:
            when = None if args.start.isdigit() else dt.datetime.fromisoformat(args.start)
            if when is not None and when.tzinfo is None:
                when = when.replace(tzinfo=dt.UTC)  # a date without offset means UTC
            kw["start"] = int(args.start) if when is None else int(when.timestamp())
        except ValueError:
            raise InputError(f"--start: not epoch seconds or an ISO date: {args.start!r}") from None
    s = synth_atlas.generate(synth.SynthConfig(**kw), args.out, progress=not args.no_progress)
    if args.json:
        _print_json(s)
    else:
        print(f"{s['results']:,} results, {s['packets']:,} packets ({s['failed_packets']:,} "
              f"failed, {s['ipv6_packets']:,} IPv6) -> {s['out']} in {s['seconds']:.1f} s")
        print(f"  world: {s['probes']} probes ({s['anchors']} anchors, {s['dual_stack_probes']} "
              f"dual-stack), {s['servers']} servers, {s['anycast_services']} anycast services, "
              f"{s['networks']} networks in {s['cities']} cities, {s['days']} days")
        print(f"  ground truth: synth.World.load({s['world']!r})")
    return EXIT_OK


def cmd_prepare(args) -> int:
    from ping_llm.data import loader, prepare
    from ping_llm.query.targets import parse_time

    cfg = prepare.PrepareConfig(**given(args, prepare.PrepareConfig),
                                since=parse_time(args.since), until=parse_time(args.until))
    card = prepare.prepare(args.inputs, args.out, cfg, overwrite=args.force,
                           progress=not args.no_progress)
    out = {"out": args.out, "card": card}
    if args.stats:
        out["stats"] = {
            split: loader.measure(args.out, split, seq_len=args.seq_len, seed=cfg.seed,
                                  max_batches=args.stats_batches)
            for split in card["rows"]
        }
    if args.json:
        _print_json(out)
        return EXIT_OK
    c = card["counts"]
    print(f"{c['measurements']:,} measurements ({c['dropped_bad_address']:,} dropped), "
          f"{c['sources']:,} sources, {c['probes']:,} probes, {c['destinations']:,} destinations, "
          f"IPv4/IPv6 {card['ip_versions']['4']:,}/{card['ip_versions']['6']:,}, "
          f"{card['time_range']['first']} .. {card['time_range']['last']} -> {args.out}")
    for name, sp in card["splits"].items():
        rows = card["rows"].get(name, {})
        print(f"  {name:<10} {sp['measurements']:>12,} meas  {rows.get('records', 0):>8,} rows  "
              f"{card['tokens'].get(name, {}).get('per_measurement_full', 0):5.2f} tok/meas  "
              f"{sp['fingerprint'][:19]}")
    for name, st in out.get("stats", {}).items():
        print(f"  stats {name:<10} padding {100 * st['padding_fraction']:.2f}% of targets, "
              f"{st['measurements_per_sequence']:.1f} meas/seq, {st['tokens_per_measurement']:.2f} "
              f"tok/meas over {st['sequences']:,} sequences of {st['seq_len']} "
              f"({st['items_per_epoch']:,} items/epoch, {st['packed_bins_per_epoch']:,} packed)")
    return EXIT_OK


def cmd_train(args) -> int:
    import contextlib
    import os
    import signal

    from ping_llm import train as tr
    from ping_llm.config import TrainConfig, config_for_run

    data_dir, *extra_data = args.data  # the first one's val is the held-out set
    config = config_for_run(args.out, args.resume, **given(args, TrainConfig), data_dir=data_dir,
                            extra_data=extra_data or None, model=_model_fields(args.model),
                            mix=_weights(args.mix))
    # With --json, stdout carries only the summary; the training log goes to stderr.
    redirect = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with redirect:
            summary = tr.train(config)
    except tr.TrainingDiverged as e:
        print(f"ping-llm train: {e}", file=sys.stderr)
        return EXIT_ERROR
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    if rank0 and args.json:
        _print_json(summary)
    elif rank0:
        tps = summary["tokens_per_s"]
        print(f"{'finished' if summary['completed'] else 'stopped (' + summary['stopped'] + ')'} "
              f"at step {summary['step']}/{summary['steps']}: loss {summary['final_loss']}, "
              f"eval loss {summary['final_eval_loss']}, {tps or 0:,.0f} tokens/s; run in "
              f"{summary['run_dir']}")
    if summary["stopped"] in ("SIGINT", "SIGTERM"):  # checkpoint saved; 128 + signal number
        return 128 + int(signal.Signals[summary["stopped"]])
    return EXIT_OK


def _model_fields(items: list[str] | None) -> dict | None:
    """--model KEY=VALUE ...: a JSON value (n_layer=2 is the number 2), else the text itself."""
    model = {}
    for kv in items or []:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise InputError(f"--model takes KEY=VALUE (e.g. n_layer=2), got {kv!r}")
        try:
            model[key] = json.loads(value)
        except json.JSONDecodeError:
            model[key] = value
    return model or None


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise InputError(f"--mix takes comma-separated weights (e.g. 0.7,0.3), got {text!r}") \
            from None


def cmd_demo(args) -> int:
    import contextlib

    from ping_llm.demo import DemoConfig, run_demo

    cfg = DemoConfig(**given(args, DemoConfig))
    redirect = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with redirect:
        summary = run_demo(cfg)
    if args.json:
        _print_json(summary)
    return EXIT_OK


def _query_engine(args):
    from ping_llm.query.engine import Engine

    return Engine.load(args.run, device=args.device, calibrated=not args.no_calibration,
                       geo_db=args.geo_db)


def _read_context(path):
    """--context FILE: measurements {src, dst, rtt_ms, time} and/or RIPE Atlas ping results as
    downloaded: a JSON array, JSON lines or concatenated JSON; gzip/bzip2/zstd allowed."""
    from ping_llm.data.streams import StreamState, decompressed, json_values, open_chunks
    from ping_llm.query.targets import MAX_CONTEXT_ITEMS, as_context

    if path is None:
        return None
    st, items = StreamState(), []
    try:
        with open_chunks(path) as chunks:
            for ok, line, x in json_values(decompressed(chunks, st)):
                if not ok:
                    raise InputError(f"context file {path}: line {line} is not JSON")
                if not isinstance(x, dict):
                    raise InputError(f"context file {path}: line {line} is not a measurement "
                                     "object {src, dst, rtt_ms} or a RIPE Atlas result")
                items.append(x)
                if len(items) > MAX_CONTEXT_ITEMS:
                    raise InputError(f"context file {path} has more than {MAX_CONTEXT_ITEMS} "
                                     "items; give only the source's recent measurements")
    except OSError as e:
        raise InputError(f"cannot read context file {path}: {e.strerror}") from None
    if st.damage:
        raise InputError(f"context file {path}: {st.damage.replace('_', ' ')}")
    if not items:
        raise InputError(f"context file {path} holds no measurements (for none, leave out "
                         "--context)")
    return as_context(items)


def _fmt_ms(x: float) -> str:
    return f"{x:.3f} ms" if x < 100 else f"{x:.1f} ms"


def cmd_query_rtt(args) -> int:
    engine = _query_engine(args)
    d = engine.rtt(args.src, args.dst, time=args.time, context=_read_context(args.context),
                   seed=args.seed)
    if args.json:
        _print_json(d.to_dict(histogram=args.histogram))
        return EXIT_OK
    how = "exact" if d.exact else f"Monte Carlo over {d.n_samples} sampled address completions"
    print(f"{args.src} -> {args.dst}  ({how})")
    print(f"P(failed)   {d.p_failed:.4f}")
    print(f"given a reply: median {_fmt_ms(d.median)}, mean {_fmt_ms(d.mean)}, "
          f"mode {_fmt_ms(d.mode)}")
    print("quantiles   " + ", ".join(f"{q:.0%} {_fmt_ms(d.quantile(q))}" for q in
                                     (0.05, 0.25, 0.5, 0.75, 0.95)))
    if args.histogram:
        for lo, hi, p in zip(*d.histogram(), strict=True):
            if p >= 1e-3:
                print(f"  [{lo:10.3f}, {hi:10.3f}) ms  {p:6.3f}  {'#' * round(60 * p)}")
    return EXIT_OK


def cmd_query_rank(args) -> int:
    engine = _query_engine(args)
    ranked = engine.rank(args.src, args.candidates, by=args.by, threshold_ms=args.threshold,
                         time=args.time, context=_read_context(args.context))
    if args.json:
        _print_json([r.to_dict() for r in ranked])
        return EXIT_OK
    extra = f"  P(<{args.threshold:g} ms)" if args.threshold is not None else ""
    print(f"rank  {'destination':<40} median      P(failed){extra}")
    for r in ranked:
        tail = f"  {r.p_below:.4f}" if r.p_below is not None else ""
        print(f"{r.rank:>4}  {r.dst:<40} {_fmt_ms(r.median_ms):<11} {r.p_failed:.4f}{tail}")
    return EXIT_OK


def cmd_query_destinations(args) -> int:
    engine = _query_engine(args)
    found = engine.destinations(args.src, args.k, rtt_below=args.rtt_below, within=args.within,
                                method="sample" if args.sample else "beam", seed=args.seed,
                                time=args.time, context=_read_context(args.context))
    if args.json:
        _print_json([d.to_dict() for d in found])
        return EXIT_OK
    print(f"{'destination':<40} {'P':>10}  median      P(failed)")
    for d in found:
        print(f"{d.dst:<40} {d.p:10.3g}  {_fmt_ms(d.rtt.median):<11} {d.rtt.p_failed:.4f}")
    return EXIT_OK


def cmd_query_score(args) -> int:
    engine = _query_engine(args)
    rtt = -1.0 if args.rtt.lower() in ("failed", "*", "-1") else args.rtt
    s = engine.score({"src": args.src, "dst": args.dst, "rtt_ms": rtt, "time": args.time},
                     context=_read_context(args.context))
    if args.json:
        _print_json(s.to_dict())
        return EXIT_OK
    for name, lp in s.fields.items():
        print(f"{name:<7} {lp:9.3f} nats")
    print(f"total   {s.total:9.3f} nats  (result given the other fields: "
          f"{s.result_conditional:.3f})")
    return EXIT_OK


def cmd_query_sample(args) -> int:
    engine = _query_engine(args)
    ms = engine.sample(args.n, args.src, seed=args.seed, temperature=args.temperature,
                       context=_read_context(args.context))
    if args.json:
        _print_json([m.to_dict() for m in ms])
    else:
        for m in ms:
            print(json.dumps(m.to_dict()))
    return EXIT_OK


def cmd_serve(args) -> int:
    from ping_llm.query.limits import Limits
    from ping_llm.query.server import serve

    limits = Limits(**given(args, Limits))
    print(f"ping-llm serve: http://{args.host}:{args.port} (docs at /docs)", file=sys.stderr)
    serve(args.run, host=args.host, port=args.port, device=args.device, limits=limits,
          calibrated=not args.no_calibration, geo_db=args.geo_db)
    return EXIT_OK




def cmd_eval(args) -> int:
    import contextlib

    from ping_llm.eval import evaluate as ev
    from ping_llm.eval.config import COMMA_FLAGS, EvalConfig
    from ping_llm.query.targets import parse_time

    if (args.since or args.until) and not args.test:
        raise InputError("--since/--until select a time window of the --test set; give --test")
    if args.test and args.splits is not None:
        raise InputError("--splits chooses the dataset's splits; with --test the external set "
                         "is evaluated instead")
    options = given(args, EvalConfig)
    for name, read in COMMA_FLAGS.items():
        if name in options:
            options[name] = read(options[name])
    if options.get("max_queries") == 0:  # on the command line 0 means all
        options["max_queries"] = None
    redirect = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with redirect:
        res = ev.evaluate(args.data, args.run, args.out, EvalConfig(**options),
                          test_paths=args.test, test_since=parse_time(args.since),
                          test_until=parse_time(args.until))
    if args.json:
        from ping_llm.eval.report import json_safe

        _print_json(json_safe(res.to_dict()))
        return EXIT_OK
    for name, split in res.splits.items():
        print(f"{name}: {split.n_evaluated} of {split.n_total} measurements")
        for method, m in split.methods.items():
            m = m.get("fallback", m)
            if "median_ae_ms" not in m:  # a P(failed)-only method
                print(f"  {method:<24} ROC-AUC of P(failed) {m.get('roc_auc', float('nan')):.3f}")
                continue
            print(f"  {method:<24} median abs error {m['median_ae_ms']:9.3f} ms  rel p50 "
                  f"{m['rel_p50']:.3f}  CRPS<=10s {m.get('crps_cens_ms') or float('nan'):9.3f} ms")
    print(f"report: {res.files['html']} ({res.timings['total_s']:.0f} s)")
    return EXIT_OK


def cmd_calibrate(args) -> int:
    import contextlib

    from ping_llm.eval.calibrate import calibrate

    if args.max_queries < 1:
        raise InputError(f"--max-queries must be >= 1, got {args.max_queries}")
    redirect = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with redirect:
        s = calibrate(args.data, args.run, max_queries=args.max_queries, seed=args.seed,
                      cold=not args.known_only, device=args.device, geo_db=args.geo_db,
                      progress=not args.no_progress)
    if args.json:
        _print_json(s)
        return EXIT_OK
    print(f"calibrated on {s['queries']} val + {s['val_probe_queries']} val_probe queries "
          f"x k={s['contexts']} "
          f"({' + '.join(s['populations'])}; {s['replies']} replies) at step {s['step']}: "
          f"{s['file']}")
    print("val coverage of the 50% / 90% intervals, before -> after (in-sample):")
    for name, rows in s["val"].items():
        for k, v in rows.items():
            b, a = v["before"], v["after"]
            who = f"{s['split_of'][name]}, {name}"
            print(f"  {who:<24} {k:<5} {b['coverage_50']:.3f} -> {a['coverage_50']:.3f}   "
                  f"{b['coverage_90']:.3f} -> {a['coverage_90']:.3f}")
    return EXIT_OK
