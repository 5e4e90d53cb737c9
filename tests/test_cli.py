"""The `ping-llm` command line contract: help with examples, exit codes, --json, and flags that
are the config dataclasses' fields (their defaults, their help, their way into the config)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys

import pytest

from ping_llm import __version__
from ping_llm.cli import build_parser, main
from ping_llm.config import TrainConfig
from ping_llm.data.prepare import PrepareConfig
from ping_llm.demo import DemoConfig
from ping_llm.eval.config import EvalConfig
from ping_llm.options import UNITS, add_arguments, given, option, show_default
from ping_llm.query.limits import Limits

VERBS = [
    "version",
    "tokens",
    "ingest",
    "synth",
    "prepare",
    "train",
    "calibrate",
    "eval",
    "query",
    "serve",
    "demo",
]


def test_console_script_is_installed_and_prints_help():
    exe = shutil.which("ping-llm") or pytest.fail("ping-llm is not on PATH (pip install -e .)")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for verb in VERBS:
        assert verb in out


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_an_example(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"ping-llm {verb}" in out


def test_parser_knows_exactly_the_documented_verbs():
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert set(sub.choices) == set(VERBS)


def test_version_json(capsys):
    assert main(["version", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ping_llm"] == __version__


def test_tokens_round_trip_through_the_cli(capsys):
    assert main(["tokens", "--encode", "2001:db8::1", "2001:db8::2", "-1", "--json"]) == 0
    ids = json.loads(capsys.readouterr().out)["tokens"]
    assert main(["tokens", "--decode", *map(str, ids), "--json"]) == 0
    (m,) = json.loads(capsys.readouterr().out)["measurements"]
    assert m == {"src": "2001:db8::1", "dst": "2001:db8::2", "rtt_ms": -1.0, "time": None}


@pytest.mark.parametrize(
    "argv",
    [
        ["tokens", "--encode", "10.0.0.1", "not-an-ip", "1.0"],
        ["tokens", "--encode", "10.0.0.1", "2001:db8::1", "1.0"],
        ["tokens", "--decode", "3", "11"],
    ],
)
def test_bad_input_exits_2_with_a_message(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ping-llm tokens: error:")


def test_usage_error_exits_2():
    r = subprocess.run(
        [sys.executable, "-m", "ping_llm.cli", "no-such-verb"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "invalid choice" in r.stderr


# ----------------------------------------------------------------------------------------------
# Flags from the config dataclasses (ping_llm.options): one place per option.

# TrainConfig fields that are deliberately not `ping-llm train` flags, and why.
NOT_TRAIN_FLAGS = {
    "stop_at": "a test hook (stop as if preempted); people stop a run with --time-limit or SIGTERM",
}
# The train flags the CLI spells itself, since none is one value of one field.
SPELLED_BY_THE_CLI = {"data_dir": "--data", "extra_data": "--data", "mix": "--mix",
                      "model": "--model", "out_dir": "--out", "resume": "--resume"}
FLAGS_FROM_FIELDS = [("train", TrainConfig), ("serve", Limits), ("demo", DemoConfig),
                     ("prepare", PrepareConfig), ("eval", EvalConfig)]


def _verb_parser(verb):
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    return sub.choices[verb]


def _flag_fields(cls):
    """The fields that are flags of their own (declared with `option`)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def test_every_train_config_field_is_a_train_flag_or_deliberately_not():
    actions = _verb_parser("train")._actions
    by_dest = {a.dest: a for a in actions}
    strings = {s for a in actions for s in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        if f.name in NOT_TRAIN_FLAGS:
            assert f.name not in by_dest and "--" + f.name.replace("_", "-") not in strings
        elif f.name in SPELLED_BY_THE_CLI:
            assert SPELLED_BY_THE_CLI[f.name] in strings, f.name
        else:  # the field's own flag, which `given` reads back by the field's name
            assert f.name in by_dest, f"TrainConfig.{f.name} is no flag: make it an option()"


@pytest.mark.parametrize(("verb", "cls"), FLAGS_FROM_FIELDS)
def test_help_shows_each_flags_default_as_the_dataclass_has_it(verb, cls):
    by_dest = {a.dest: a for a in _verb_parser(verb)._actions}
    for f in _flag_fields(cls):
        help = by_dest[f.name].help
        assert help.startswith(f.metadata["help"]), f.name
        store = f.metadata["argparse"].get("action") in ("store_true", "store_false")
        if f.default is None or store:  # the help says what none means / the flag is the change
            assert help == f.metadata["help"], f.name
            continue
        shown = re.fullmatch(r".*\((.+)\)", help).group(1)
        unit = UNITS.get(f.metadata["unit"], 1)  # a flag in minutes or MB shows its unit
        if isinstance(f.default, bool):
            assert shown == ("on" if f.default else "off"), f.name
        elif isinstance(f.default, tuple):  # as the comma-separated flag takes it
            assert shown == ",".join(map(str, f.default)), f.name
        else:
            assert float(shown) * unit == f.default if unit != 1 else \
                type(f.default)(shown) == f.default, (f.name, shown)


def test_every_help_text_prints(capsys):
    for verb, _ in FLAGS_FROM_FIELDS:  # argparse %-formats help: a field's doc must survive it
        with pytest.raises(SystemExit):
            main([verb, "--help"])
    assert "--batch-size N" in capsys.readouterr().out


@pytest.fixture
def trained(monkeypatch, tmp_path):
    """`ping-llm train ARGS`, which returns the TrainConfig it would have trained."""
    import ping_llm.train

    seen = []

    def train(config):
        seen.append(config)
        return {"stopped": None}  # all that `ping-llm train --json` reads of a summary

    monkeypatch.setattr(ping_llm.train, "train", train)

    def run(*args):
        argv = ["train", "--data", "a", "--out", str(tmp_path / "run"), *args, "--json"]
        assert main(argv) == 0
        return seen.pop()

    return run


def test_train_without_flags_trains_the_dataclass_defaults(trained, tmp_path):
    assert trained() == TrainConfig(data_dir="a", out_dir=str(tmp_path / "run"))


@pytest.mark.parametrize(
    ("args", "fields"),
    [
        (["--batch-size", "4"], {"device_batch_size": 4}),
        (["--time-limit", "1.5"], {"time_limit_s": 90.0}),  # minutes on the command line
        (["--time-budget", "2"], {"time_budget_s": 120.0}),
        (["--compile"], {"compile": True}),
        (["--knowledge", "--geo-db", "g.mmdb"], {"knowledge": True, "geo_db": "g.mmdb"}),
        (["--model", "n_layer=2", "--model", "act=relu"],
         {"model": {"n_layer": 2, "act": "relu"}}),
        (["--data", "b", "--data", "c", "--mix", "0.5,0.3,0.2"],
         {"data_dir": "a", "extra_data": ["b", "c"], "mix": [0.5, 0.3, 0.2]}),
        (["--matrix-lr", "0.01", "--preset", "small", "--dtype", "float32"],
         {"matrix_lr": 0.01, "preset": "small", "dtype": "float32"}),
        (["--steps", "7", "--resume"], {"steps": 7, "resume": True}),  # nothing to resume yet
    ],
)
def test_a_train_flag_reaches_the_config(trained, args, fields):
    cfg = trained(*args)
    assert {k: getattr(cfg, k) for k in fields} == fields


def test_only_the_flags_given_override_so_a_resumed_run_keeps_its_own():
    parse = _verb_parser("train").parse_args
    assert given(parse(["--data", "a", "--out", "r"]), TrainConfig) == {}
    assert given(parse(["--data", "a", "--out", "r", "--no-compile", "--seed", "0"]),
                 TrainConfig) == {"compile": False, "seed": 0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mix", "0.5,x"], "--mix takes comma-separated weights (e.g. 0.7,0.3), got '0.5,x'"),
        (["--model", "n_layer"], "--model takes KEY=VALUE (e.g. n_layer=2), got 'n_layer'"),
        (["--batch-size", "0"], "device_batch_size must be a positive integer, got 0"),
        (["--time-limit", "0"], "time_limit_s must be a positive number or None, got 0.0"),
    ],
)
def test_bad_train_values_exit_2_with_a_message(args, message, tmp_path, capsys):
    assert main(["train", "--data", "a", "--out", str(tmp_path), *args]) == 2
    assert capsys.readouterr().err == f"ping-llm train: error: {message}\n"


def test_a_flag_of_the_wrong_type_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "a", "--out", "r", "--steps", "many"])
    assert e.value.code == 2 and "--steps: invalid int value: 'many'" in capsys.readouterr().err


def test_serve_flags_reach_the_services_limits(monkeypatch):
    import ping_llm.query.server

    seen = {}
    monkeypatch.setattr(ping_llm.query.server, "serve", lambda run, **kw: seen.update(kw))
    assert main(["serve", "--run", "r", "--max-cost", "7", "--wait-ms", "0.5"]) == 0
    assert seen["limits"] == Limits(max_cost=7, wait_ms=0.5)


def test_demo_flags_reach_its_config(capsys):
    assert main(["demo", "--minutes", "0"]) == 2  # DemoConfig refuses it before anything runs
    assert capsys.readouterr().err == "ping-llm demo: error: --minutes must be positive, got 0.0\n"


def test_a_flag_in_another_unit_shows_and_converts_its_default_in_that_unit():
    @dataclasses.dataclass
    class Config:
        cap_bytes: int = option(8 << 20, "cap", flag="--cap-mb", unit="MB")

    parser = argparse.ArgumentParser()
    add_arguments(parser, Config)
    (action,) = [a for a in parser._actions if a.dest == "cap_bytes"]
    assert (action.option_strings, action.metavar, action.help) == (["--cap-mb"], "MB", "cap (8)")
    assert given(parser.parse_args(["--cap-mb", "0.5"]), Config) == {"cap_bytes": 1 << 19}


def _all_parsers():
    """(name, parser) of every verb and query sub-verb."""
    for verb, p in _verb_parser_choices().items():
        yield verb, p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                yield from ((f"{verb} {q}", qp) for q, qp in a.choices.items())


def _verb_parser_choices():
    return next(a for a in build_parser()._actions if a.dest == "verb").choices


def test_every_flag_with_a_default_shows_it_once_at_the_end_of_its_help():
    """Defaults are written where a flag is defined (a field, or the add_argument call) and the
    help shows them from there: a help text never types a default itself."""
    checked = 0
    for name, p in _all_parsers():
        text = "".join(p.format_help().split())  # wrapping (and its hyphen breaks) aside
        for a in p._actions:
            d = a.default
            if not a.option_strings or d is None or d is False or d == argparse.SUPPRESS:
                continue
            shown = show_default(d)
            assert "".join((a.help + shown).split()) in text, (name, a.dest)
            assert shown not in a.help, f"{name} {a.option_strings[0]} types its default itself"
            checked += 1
    assert checked > 20
