"""`ping-llm`: the command line. One verb per Python API entry point.

Here are the verbs and their flags, and `main`, which runs one and maps errors to exit statuses;
what each verb does is in `ping_llm.verbs`. The flags that set a config dataclass's fields
(TrainConfig, Limits, DemoConfig, PrepareConfig, EvalConfig) come from those fields
(`ping_llm.options`): their help and defaults are the fields'; every other flag's help shows its
default from its `add_argument` (`_Help`). Exit status: 0 success, 2 usage or input error (one
line on stderr, also for a path the OS refuses), 3 finished but some input was rejected
(ingest), 130 / 143 interrupted by SIGINT / SIGTERM (train checkpoints first), 1 anything else.
Nothing here imports torch, so that `ping-llm --help` stays quick (0.3 s, most of it the data
side's numpy and pyarrow).
"""

from __future__ import annotations

import argparse
import errno
import sys

from ping_llm import __version__, verbs
from ping_llm.config import TrainConfig
from ping_llm.data.prepare import PrepareConfig
from ping_llm.demo import DemoConfig
from ping_llm.errors import InputError
from ping_llm.eval.config import EvalConfig
from ping_llm.eval.queries import CONTEXTS, MAX_QUERIES
from ping_llm.options import add_arguments, show_default
from ping_llm.query.limits import Limits
from ping_llm.verbs import EXIT_ERROR, EXIT_OK, EXIT_USAGE

# OS errors that mean "this path, as given, cannot be used" (usage, exit 2) rather than a failure
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}

RUN_GEO_DB_HELP = ("the MaxMind database of a run that reads address knowledge (default: the one "
                   "it recorded)")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Help that ends with the flag's default, written once where the flag is defined (the
    fields' flags, `options.option`, already carry theirs: their parser default is None)."""

    def _get_help_string(self, action) -> str:
        help = action.help or ""
        d = action.default  # (0 == False: compare by identity)
        if action.option_strings and d is not None and d is not False and d != argparse.SUPPRESS:
            help = help.replace("%", "%%") + show_default(action.default)
        return help


# ----------------------------------------------------------------------------------------------
# verbs' flags


def _train_arguments(p: argparse.ArgumentParser) -> None:
    # The flags that are not one value of one TrainConfig field; every other one is a field's.
    p.add_argument("--data", required=True, action="append", metavar="DATASET_DIR",
                   help="prepared dataset; repeat it to train on a mixture (the first one's val "
                        "is the held-out set)")
    p.add_argument("--mix", metavar="W1,W2,...",
                   help="the mixture's weights, one per --data (default: by train measurements)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (checkpoint)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN_DIR's checkpoint (its settings unless given again); "
                        "starts fresh if there is none. With a larger --steps it extends a "
                        "finished run: the lr schedule is re-planned for the new total")
    p.add_argument("--model", action="append", metavar="KEY=VALUE",
                   help="override a model field, e.g. --model n_layer=2 --model sequence_len=256")
    add_arguments(p, TrainConfig)
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _query_arguments(p: argparse.ArgumentParser) -> None:
    qs = p.add_subparsers(dest="question", metavar="QUESTION")
    qs.required = True

    def question(name, help, example, func):
        q = qs.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                          formatter_class=_Help)
        q.set_defaults(func=func)
        q.add_argument("--run", required=True, metavar="RUN_DIR", help="trained run directory")
        q.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
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
                 "ping-llm query rtt --run runs/tiny 192.0.2.1 10.1.2.0/24 --json",
                 verbs.cmd_query_rtt)
    q.add_argument("src", metavar="SRC", help="address or CIDR prefix")
    q.add_argument("dst", metavar="DST", help="address or CIDR prefix")
    q.add_argument("--seed", type=int, default=0, help="Monte Carlo seed for large prefixes")
    q.add_argument("--histogram", action="store_true", help="print the byte1-bin histogram")

    q = question("rank", "order candidate destinations by predicted latency",
                 "ping-llm query rank --run runs/tiny 192.0.2.1 8.8.8.8 1.1.1.1 9.9.9.9",
                 verbs.cmd_query_rank)
    q.add_argument("src", metavar="SRC")
    q.add_argument("candidates", metavar="CANDIDATE", nargs="+")
    q.add_argument("--by", choices=["median", "p_below"], default="median",
                   help="order by predicted median, or by P(reply and rtt < --threshold)")
    q.add_argument("--threshold", type=float, metavar="MS", help="for --by p_below")

    q = question("destinations", "likely destinations for a source (beam search or sampling)",
                 "ping-llm query destinations --run runs/tiny 192.0.2.1 --k 5 --rtt-below 20",
                 verbs.cmd_query_destinations)
    q.add_argument("src", metavar="SRC")
    q.add_argument("--k", type=int, default=10, help="how many")
    q.add_argument("--rtt-below", type=float, metavar="MS", help="only RTTs below this")
    q.add_argument("--within", metavar="CIDR", help="only destinations inside this prefix")
    q.add_argument("--sample", action="store_true", help="k ancestral draws instead of beams")
    q.add_argument("--seed", type=int, default=0, help="seed of the --sample draws")

    q = question("score", "log-probability per field of an observed measurement (anomaly score)",
                 "ping-llm query score --run runs/tiny 192.0.2.1 8.8.8.8 12.5",
                 verbs.cmd_query_score)
    q.add_argument("src", metavar="SRC")
    q.add_argument("dst", metavar="DST")
    q.add_argument("rtt", metavar="RTT_MS", help="milliseconds, or 'failed'")

    q = question("sample", "a synthetic measurement stream from the model",
                 "ping-llm query sample --run runs/tiny --n 20 --src 192.0.2.1",
                 verbs.cmd_query_sample)
    q.add_argument("--n", type=int, default=10, help="measurements")
    q.add_argument("--src", help="fix the source address")
    q.add_argument("--seed", type=int, default=0, help="seed of the draws")
    q.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits before each draw (below 1: sharper)")


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="trained run directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (the service has no authentication)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    add_arguments(p, Limits)
    p.add_argument("--no-calibration", action="store_true",
                   help="serve the raw model's distributions, not the run's calibration.json")
    p.add_argument("--geo-db", metavar="FILE", help=RUN_GEO_DB_HELP)


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DATASET_DIR",
                   help="the prepared dataset the run was trained on")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="trained run directory")
    p.add_argument("--out", required=True, metavar="REPORT_DIR",
                   help="writes report.html, summary.md and metrics.json here")
    p.add_argument("--test", nargs="+", metavar="PARQUET",
                   help="evaluate on these canonical Parquet files/dirs instead of the test "
                   "splits (train still fits the baselines and gives context)")
    p.add_argument("--since", metavar="TIME",
                   help="--test: keep only measurements at or after TIME (epoch s or ISO 8601)")
    p.add_argument("--until", metavar="TIME",
                   help="--test: keep only measurements before TIME (epoch s or ISO 8601)")
    add_arguments(p, EvalConfig)
    p.add_argument("--json", action="store_true", help="print all numbers as JSON")


# ----------------------------------------------------------------------------------------------
# parser


def _add(sub, name: str, help: str, example: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {example}",
        formatter_class=_Help,
    )
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ping-llm",
        description="A generative foundation model of Internet latency (RIPE Atlas pings).",
        epilog="example:\n  ping-llm demo --minutes 10",
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"ping-llm {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = _add(sub, "version", "print versions", "ping-llm version --json", verbs.cmd_version)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _add(
        sub,
        "tokens",
        "encode one measurement into the token language, or decode token ids",
        "ping-llm tokens --encode 192.0.2.1 8.8.8.8 12.5 --time 1700000000",
        verbs.cmd_tokens,
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
        verbs.cmd_ingest,
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
                   help="source identity: auto = src_addr if globally routable else from, "
                   "always the controller-seen `from`, or always `src_addr`")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes, parallel over files")
    p.add_argument("--rejects", metavar="FILE", help="write all reject records here (JSON lines)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p = _add(
        sub,
        "synth",
        "generate RIPE-format ping results from the synthetic Internet (with ground truth)",
        "ping-llm synth --out synth.jsonl.gz --seed 0\n"
        "  ping-llm synth --out small.jsonl --probes 30 --days 0.5 --json",
        verbs.cmd_synth,
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
        verbs.cmd_prepare,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="canonical Parquet files or dirs")
    p.add_argument("--out", required=True, metavar="DATASET_DIR", help="dataset directory")
    add_arguments(p, PrepareConfig)
    p.add_argument("--since", metavar="TIME",
                   help="keep only measurements at or after TIME (epoch s or ISO 8601, UTC)")
    p.add_argument("--until", metavar="TIME",
                   help="keep only measurements before TIME (epoch s or ISO 8601, UTC)")
    p.add_argument("--force", action="store_true", help="replace an existing dataset")
    p.add_argument("--stats", action="store_true",
                   help="run the training sampler and print padding etc. per split")
    p.add_argument("--stats-batches", type=int, default=200, metavar="N",
                   help="batches of 16 sequences sampled per split for --stats")
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
        verbs.cmd_train,
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
        verbs.cmd_eval,
    )
    _eval_arguments(p)
    p = _add(
        sub,
        "calibrate",
        "fit the run's calibration of its distributions on the val splits (calibration.json)",
        "ping-llm calibrate --data data/prepared --run runs/tiny\n\n"
        "Every query, eval and the server then apply it (--no-calibration turns it off there).",
        verbs.cmd_calibrate,
    )
    p.add_argument("--data", required=True, metavar="DATASET_DIR",
                   help="the prepared dataset the run was trained on (its val and val_probe "
                   "splits)")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="trained run directory")
    p.add_argument("--max-queries", type=int, default=MAX_QUERIES, metavar="N",
                   help=f"val measurements, each asked at every k of "
                   f"{','.join(map(str, CONTEXTS))}, about the known source and about it "
                   "re-addressed; as many of val_probe, about its new probes")
    p.add_argument("--known-only", action="store_true",
                   help="fit on the known sources only, not also on new ones (val re-addressed, "
                   "val_probe)")
    p.add_argument("--geo-db", metavar="FILE", help=RUN_GEO_DB_HELP)
    p.add_argument("--seed", type=int, default=0, help="subsample / PIT seed")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
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
        verbs.cmd_serve,
    )
    _serve_arguments(p)
    p = _add(
        sub,
        "demo",
        "the main job: synth -> ingest -> prepare -> train -> calibrate -> eval -> report -> "
        "queries",
        "ping-llm demo --out demo --minutes 10",
        verbs.cmd_demo,
    )
    add_arguments(p, DemoConfig)
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
