"""The `ping-llm` command line contract: help with examples, exit codes, --json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ping_llm import __version__
from ping_llm.cli import build_parser, main

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
