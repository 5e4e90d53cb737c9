"""`ping-llm demo`, end to end on a reduced budget: every artefact exists and the numbers make
sense (the model beats the global-median baseline on pairs it never saw)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

# The module fixture runs the whole demo (~3 min on 2 idle cores); allow for a busy machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    argv = [sys.executable, "-m", "ping_llm.cli", "demo", "--out", str(out), "--minutes", "4",
            "--probes", "24", "--days", "1", "--steps", "120", "--seq-len", "256",
            "--eval-queries", "40", "--json"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=1100)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(r.stdout), r.stderr


def test_every_stage_finished_and_is_recorded(demo_dir):
    out, summary, _ = demo_dir
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == ["synth", "ingest", "prepare", "train", "calibrate", "eval",
                            "queries"]
    assert summary["stages"] == stages


def test_artefacts_exist_and_describe_themselves(demo_dir):
    out, summary, _ = demo_dir
    card = json.loads((out / "dataset" / "card.json").read_text())
    assert set(card["splits"]) == {"train", "val", "val_probe", "test_time", "test_probe",
                                  "test_pair"}
    assert all(card["splits"][s]["measurements"] > 0 for s in card["splits"])
    meta = json.loads((out / "run" / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 120
    assert (out / "run" / "checkpoint" / "model.safetensors").stat().st_size > 1_000_000
    html = (out / "report" / "report.html").read_text()
    # self-contained: nothing is loaded from the network (the text may name a URL: the
    # geolocation database's attribution does)
    assert "<img" in html and "<script" not in html
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html)
    assert summary["report"] == str(out / "report" / "report.html")
    # the distributions are calibrated on val, and the report says so
    cal = json.loads((out / "run" / "calibration.json").read_text())
    assert cal["fitted"]["step"] == 120 and cal["fitted"]["split"] == "val"
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["run"]["calibration"]["step"] == 120
    assert "calibrated on val" in (out / "report" / "summary.md").read_text()


def test_model_beats_the_global_median_on_held_out_pairs(demo_dir):
    out, _, _ = demo_dir
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    methods = metrics["splits"]["test_pair"]["methods"]
    model = methods["model k=0"]["median_ae_ms"]
    baseline = methods["global_median"]["fallback"]["median_ae_ms"]
    assert model < baseline, (model, baseline)


def test_queries_print_a_distribution_a_prefix_and_a_ranking(demo_dir):
    out, summary, log = demo_dir
    q = summary["stages"]["queries"]
    assert q["prefix"].endswith("/24") and q["median_ms"] > 0
    assert "ranking" in log and "truth" in log


def test_rerun_skips_finished_stages(demo_dir):
    out, _, _ = demo_dir
    argv = [sys.executable, "-m", "ping_llm.cli", "demo", "--out", str(out), "--minutes", "4",
            "--probes", "24", "--days", "1", "--steps", "120", "--seq-len", "256",
            "--eval-queries", "40"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("done already") == 7
