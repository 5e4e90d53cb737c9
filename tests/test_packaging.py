"""The installed package against the README: what the main install gives is what the tour uses.

The README's main command installs `pip install -e .` without extras, so every third-party module
the code imports must be a plain (not extra-only) requirement of the installed distribution; the
one exception is wandb, an extra that only `train --wandb` loads and whose error names the extra.
The scripts that ship (the GPU check) are run too, in the mode a CPU can run.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ping_llm.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "ping_llm"
EXTRA_ONLY = {"wandb"}  # imported only behind `train --wandb`, with a message naming the extra


def _imported_top_level_modules() -> set[str]:
    names = set()
    for path in SRC.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions too
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "ping_llm"}


def _plain_requirements() -> set[str]:
    reqs = [Requirement(r) for r in md.requires("ping-llm") or []]
    return {_norm(r.name) for r in reqs if r.marker is None or "extra" not in str(r.marker)}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_module_the_code_imports_comes_with_the_main_install():
    by_module = md.packages_distributions()
    plain = _plain_requirements()
    missing = []
    for mod in sorted(_imported_top_level_modules() - EXTRA_ONLY):
        dists = {_norm(d) for d in by_module.get(mod, [])}
        # a dependency's own dependency counts only if we require it ourselves
        if not dists & plain:
            missing.append(f"{mod} (from {sorted(dists) or 'no installed distribution'})")
    assert not missing, f"imported but not a plain requirement of ping-llm: {missing}"


def test_the_server_is_part_of_the_main_install():
    assert {"fastapi", "uvicorn"} <= _plain_requirements()


def test_every_verb_the_readme_tours_exists():
    readme = (REPO / "README.md").read_text()
    tour = readme.split("## A tour", 1)[1].split("\n## ", 1)[0]
    verbs = set(re.findall(r"\bping-llm ([a-z]+)\b", tour))
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert {"demo", "ingest", "serve", "query"} <= verbs  # the tour is what it says it is
    assert verbs <= set(sub.choices), verbs - set(sub.choices)


@pytest.mark.slow
def test_the_gpu_check_script_runs_end_to_end_in_its_cpu_smoke_mode(tmp_path):
    """scripts/gpu_check.sh must work the day a GPU is lent: its smoke mode runs the same
    stages on the CPU with tiny shapes and must write a complete summary."""
    env = dict(os.environ, GPU_CHECK_SMOKE="1", OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["rc"] for s in summary["stages"]] == [0, 0, 0]
    assert summary["train"]["results"][0]["tokens_per_s"] > 0
    assert summary["query_k16"]["context"] == 16 and summary["query_k0"]["exact_batched_qps"] > 0
