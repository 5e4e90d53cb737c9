"""`ping-llm`: the command line. One verb per Python API entry point (SPEC §10).

Each verb is a thin adapter: parse arguments, call the library, print (plain text or `--json`).
Exit status: 0 success, 2 usage or input error (message on stderr), 3 finished but some input was
rejected (ingest), 1 anything else. Imports of heavy modules happen inside the verbs so that
`ping-llm --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys

from ping_llm import __version__
from ping_llm.errors import InputError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3


class _NotBuilt(Exception):
    pass


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


def _not_built(name: str):
    def run(args) -> int:
        raise _NotBuilt(f"`ping-llm {name}` is not built yet")

    return run


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

    _add(
        sub,
        "ingest",
        "RIPE Atlas ping results (JSON) -> canonical Parquet",
        "ping-llm ingest ping-2024-01-01T0000.bz2 --out data/canonical",
        _not_built("ingest"),
    )
    _add(
        sub,
        "synth",
        "generate RIPE-format ping results from the synthetic Internet",
        "ping-llm synth --out synth.jsonl.gz --seed 0",
        _not_built("synth"),
    )
    _add(
        sub,
        "prepare",
        "canonical Parquet -> splits + probe-centric ArrayRecord rows + dataset card",
        "ping-llm prepare data/canonical --out data/prepared",
        _not_built("prepare"),
    )
    _add(
        sub,
        "train",
        "train the Transformer on a prepared dataset",
        "ping-llm train --data data/prepared --out runs/tiny --preset tiny",
        _not_built("train"),
    )
    _add(
        sub,
        "eval",
        "evaluate a run against the baselines on the test splits",
        "ping-llm eval --data data/prepared --run runs/tiny --out report/",
        _not_built("eval"),
    )
    _add(
        sub,
        "query",
        "ask a trained model latency questions",
        "ping-llm query rtt --run runs/tiny 192.0.2.1 8.8.8.8 --json",
        _not_built("query"),
    )
    _add(
        sub,
        "serve",
        "HTTP JSON service over the query engine",
        "ping-llm serve --run runs/tiny --port 8000",
        _not_built("serve"),
    )
    _add(
        sub,
        "demo",
        "the main job: synth -> ingest -> prepare -> train -> eval -> report -> queries",
        "ping-llm demo --out demo --minutes 10",
        _not_built("demo"),
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except InputError as e:
        print(f"ping-llm {args.verb}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except _NotBuilt as e:
        print(f"{e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
