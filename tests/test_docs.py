"""The docs are part of the product and are tested like it (the way sqlite-utils tests its docs).

1. Every verb and sub-verb of `ping_llm.cli.build_parser()` has a section in docs/cli.md with an
   example the parser accepts, and docs/cli.md documents no verb that does not exist.
2. Every ```bash block of README.md either runs here, for real, in a temporary directory on real
   RIPE Atlas results (../shared/data), or says why not in an HTML comment just above it:
   `<!-- not run by tests/test_docs.py: REASON -->`. A new block that is neither fails the suite.
   A run changes what a command does only through the explicit table of each block below
   (`Run.changes`): sizes (steps, batch, queries), and for the one command written for a GPU the
   device; every change must apply to the README text, so none goes stale silently. Commands
   that cannot run are still parsed by the real parser, so their flags cannot rot either.
3. The contracts live in docs/: what the code cites there exists (files, quoted headings, link
   anchors), the docs name every column, reject reason, answer field, endpoint and limit the code
   has, and nothing cites an outside specification.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from ping_llm import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
CLI_DOC = DOCS / "cli.md"
NOT_RUN = re.compile(r"<!--\s*not run by tests/test_docs\.py:\s*(.*?)\s*-->")


# ----------------------------------------------------------------------------------------------
# reading Markdown


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced code block: its language, text, first line number and the HTML comments on the
    lines just above its fence."""

    lang: str
    text: str
    line: int
    comments: tuple[str, ...]

    @property
    def not_run(self) -> str | None:
        """The reason given in a `not run` comment above the block, or None."""
        for c in self.comments:
            m = NOT_RUN.search(c)
            if m:
                return m.group(1)
        return None

    def commands(self) -> list[str]:
        """The shell commands, continuation lines joined, comment-only lines left out."""
        out, cur = [], ""
        for raw in self.text.splitlines():
            line = raw.rstrip()
            if not cur and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.endswith("\\"):
                cur += line[:-1].rstrip() + " "
                continue
            out.append(" ".join((cur + line.strip()).split()))
            cur = ""
        if cur:
            out.append(" ".join(cur.split()))
        return out


def blocks(path: Path) -> list[Block]:
    return blocks_in(path.read_text())


def blocks_in(text: str) -> list[Block]:
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i - 1
        comments = []
        while j >= 0 and lines[j].strip().startswith("<!--"):
            comments.insert(0, lines[j].strip())
            j -= 1
        k = i + 1
        while k < len(lines) and not lines[k].startswith("```"):
            k += 1
        out.append(Block(m.group(1), "\n".join(lines[i + 1 : k]), i + 1, tuple(comments)))
        i = k + 1
    return out


def sections(path: Path) -> list[tuple[int, str, str]]:
    """(level, heading, body up to the next heading of the same or a higher level)."""
    lines = path.read_text().splitlines()
    heads = [(i, len(m.group(1)), m.group(2).strip()) for i, line in enumerate(lines)
             if (m := re.match(r"^(#{1,6})\s+(.*)$", line)) and not _in_fence(lines, i)]
    out = []
    for n, (i, level, title) in enumerate(heads):
        end = next((j for j, lv, _ in heads[n + 1 :] if lv <= level), len(lines))
        out.append((level, title, "\n".join(lines[i + 1 : end])))
    return out


def _in_fence(lines: list[str], i: int) -> bool:
    return sum(1 for line in lines[:i] if line.startswith("```")) % 2 == 1


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def readme_bash_blocks() -> list[Block]:
    return [b for b in blocks(README) if b.lang == "bash"]


# ----------------------------------------------------------------------------------------------
# commands -> the parser


def cli_argv(command: str) -> list[list[str]]:
    """The `ping-llm` argument lists in a shell command line: `ping-llm ...`, `python -m
    ping_llm.cli ...` (under torchrun too) and `scripts/slurm_train.sh ...` (which runs
    `ping-llm train --resume ...`); a leading `$ ` of a transcript is dropped."""
    command = command.removeprefix("$ ")
    out = []
    for part in re.split(r"&&|\|\||;|\|", command):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            continue
        if "ping-llm" in words:
            out.append(words[words.index("ping-llm") + 1 :])
        elif "ping_llm.cli" in words and words[words.index("ping_llm.cli") - 1] == "-m":
            out.append(words[words.index("ping_llm.cli") + 1 :])
        elif any(w.endswith("scripts/slurm_train.sh") for w in words):
            at = next(i for i, w in enumerate(words) if w.endswith("scripts/slurm_train.sh"))
            out.append(["train", "--resume", *words[at + 1 :]])
    return out


def parses(argv: list[str]) -> str | None:
    """None if the real parser accepts argv, else its complaint."""
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cli.build_parser().parse_args(argv)
    except SystemExit as e:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue() else f"exit {e.code}"
    return None


def verb_paths() -> list[tuple[str, ...]]:
    """Every verb and sub-verb of the parser, read from its subparsers."""
    import argparse

    def walk(parser, path):
        out = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append((*path, name))
                    out += walk(sub, (*path, name))
        return out

    return walk(cli.build_parser(), ())


# ----------------------------------------------------------------------------------------------
# 1. the command-line doc


def _cli_sections() -> dict[str, str]:
    """`ping-llm VERB [SUB]` -> the body of its section in docs/cli.md."""
    out = {}
    for _, title, body in sections(CLI_DOC):
        m = re.fullmatch(r"`ping-llm ([a-z_ -]+)`", title)
        if m:
            out[m.group(1)] = body
    return out


@pytest.mark.parametrize("path", verb_paths(), ids=" ".join)
def test_every_verb_and_sub_verb_has_a_section_with_an_example(path):
    name = " ".join(path)
    body = _cli_sections().get(name)
    assert body is not None, f"docs/cli.md has no section headed `ping-llm {name}`"
    examples = [c for b in blocks_in(body) if b.lang == "bash" for c in b.commands()
                if c.startswith(f"ping-llm {name} ") or c == f"ping-llm {name}"]
    assert examples, f"docs/cli.md, `ping-llm {name}`: no example in a ```bash block"
    for ex in examples:
        for argv in cli_argv(ex):
            assert parses(argv) is None, f"docs/cli.md example {ex!r}: {parses(argv)}"
    if len(path) == 1:  # the verb is in the overview table too
        assert re.search(rf"^\| `{path[0]}` \|", CLI_DOC.read_text(), re.M), path[0]


def test_the_cli_doc_documents_no_verb_that_does_not_exist():
    real = {" ".join(p) for p in verb_paths()}
    assert set(_cli_sections()) <= real, set(_cli_sections()) - real


def test_the_cli_doc_gives_every_exit_status_the_code_uses():
    text = CLI_DOC.read_text().split("## Exit status", 1)[1].split("\n## ", 1)[0]
    cells = re.findall(r"^\|\s*([\d /]+?)\s*\|", text, re.M)  # "0", "130 / 143"
    documented = {int(n) for cell in cells for n in cell.split("/")}
    # the EXIT_* constants of the command line's modules, and train's interrupted exits
    codes = {v for name, mod in list(sys.modules.items()) if name.startswith("ping_llm")
             for k, v in vars(mod).items() if k.startswith("EXIT_") and isinstance(v, int)}
    assert len(codes) >= 4, "the command line's EXIT_* constants moved"
    codes |= {128 + signal.SIGINT, 128 + signal.SIGTERM}
    assert documented == codes, documented ^ codes


# ----------------------------------------------------------------------------------------------
# 2. README's command blocks


@dataclasses.dataclass(frozen=True)
class Change:
    """One departure of a run from the README text, and why. `written` None: appended."""

    command: str  # the command it applies to starts with this
    written: str | None
    run: str
    why: str


@dataclasses.dataclass(frozen=True)
class Run:
    """How a README block runs here. Its commands run one by one, in README order, in one
    working directory shared with the blocks before it (a reader following the tour)."""

    first: str  # the block's first command starts with this
    changes: tuple[Change, ...] = ()
    skip: tuple[tuple[str, str], ...] = ()  # (command start, why it is not run)
    background: tuple[str, ...] = ()  # servers: started, asked, stopped (see _serve)


RUNS = {
    "real-data": Run(
        first="ping-llm ingest ping-2024-01-*.bz2",
        changes=(
            Change("ping-llm train", "--preset small", "--preset tiny",
                   "model size: 0.86M parameters instead of 98.6M"),
            Change("ping-llm train", "--batch-size 16", "--batch-size 2", "batch size"),
            Change("ping-llm train", "--total-batch-tokens 262144", "--total-batch-tokens 2048",
                   "tokens per step: one micro-batch of 2 x 1024"),
            Change("ping-llm train", "--steps 20000", "--steps 10", "training length"),
            Change("ping-llm train", "--device cuda", "--device cpu",
                   "the suite runs on CPU (tests/test_cuda.py, scripts/gpu_check.sh: the GPU)"),
            Change("ping-llm train", "--compile", "",
                   "torch.compile belongs to the GPU path; on CPU it would take minutes"),
            Change("ping-llm calibrate", None, "--max-queries 10", "val queries: 10, not 500"),
            Change("ping-llm eval", None, "--max-queries 10 --contexts 0,4",
                   "queries per split: 10, not 500; context sizes 0 and 4, not 0,1,4,16,64"),
            Change("ping-llm serve", None, "--port {port}",
                   "a free port: the machine may run another server on 8000"),
        ),
        background=("ping-llm serve",),
    ),
    "context-from-atlas": Run(
        first='curl -s "https://atlas.ripe.net/api/v2/measurements/$MSM/results/',
        skip=(("curl ", "needs the internet (the RIPE Atlas API); mine.json is written instead: "
                        "one probe's results of one measurement from the real sample, as the API "
                        "serves them (a JSON array), with MSM, PRB, SRC and DST set to match"),),
    ),
}

# What the working directory holds before the first block (the stand-ins for downloads):
# ping-2024-01-01T0000.bz2 and ping-2024-01-02T0000.bz2, daily-dump format (one result per
# line, bzip2), holding every 20th result of ../shared/data/ripe_atlas_menog_2019 (real RIPE
# Atlas data, ~9k results, 93 probes), cut in two at the median time; the names are the
# README's, the dates in them are not the data's.
SAMPLE = "ripe_atlas_menog_2019"
EVERY = 20


def readme_block(name: str) -> Block:
    for b in readme_bash_blocks():
        found = run_of(b)
        if found and found[0] == name:
            return b
    raise AssertionError(f"README.md has no block for RUNS[{name!r}]")


def run_of(block: Block) -> tuple[str, Run] | None:
    cmds = block.commands()
    for name, r in RUNS.items():
        if cmds and cmds[0].startswith(r.first):
            return name, r
    return None


def as_run(command: str, run: Run, port: int = 0) -> str | None:
    """The command as it runs here (None: skipped), after the block's changes."""
    if any(command.startswith(s) for s, _ in run.skip):
        return None
    for ch in run.changes:
        if not command.startswith(ch.command):
            continue
        new = ch.run.format(port=port)
        if ch.written is None:
            command = re.sub(r"\s+#.*$", "", command) + " " + new
        else:
            pat = rf"(?<!\S){re.escape(ch.written)}(?!\S)"
            command = re.sub(pat, new, command, count=1)
    return " ".join(command.split())


def test_every_readme_bash_block_runs_here_or_says_why_not():
    seen = set()
    for b in readme_bash_blocks():
        found = run_of(b)
        where = f"README.md line {b.line} ({b.commands()[0][:60]!r})"
        if b.not_run is not None:
            assert b.not_run, f"{where}: a `not run` comment must give the reason"
            assert found is None, f"{where} is both marked `not run` and in RUNS"
            continue
        assert found is not None, (
            f"{where} is a new ```bash block: run it in tests/test_docs.py (RUNS) or mark it "
            "<!-- not run by tests/test_docs.py: REASON --> on the line above")
        seen.add(found[0])
    assert seen == set(RUNS), f"RUNS entries without their README block: {set(RUNS) - seen}"


@pytest.mark.parametrize("name", list(RUNS))
def test_every_change_a_run_makes_applies_to_the_readme_text(name):
    run = RUNS[name]
    cmds = readme_block(name).commands()
    for ch in run.changes:
        targets = [c for c in cmds if c.startswith(ch.command)]
        assert len(targets) == 1, f"{name}: {ch.command!r} is not exactly one command"
        if ch.written is not None:
            assert re.search(rf"(?<!\S){re.escape(ch.written)}(?!\S)", targets[0]), (
                f"{name}: {ch.written!r} is no longer in {targets[0]!r}; update RUNS")
    for start, _ in run.skip:
        assert any(c.startswith(start) for c in cmds), f"{name}: nothing to skip at {start!r}"
    for start in run.background:
        assert any(c.startswith(start) for c in cmds), f"{name}: no command {start!r}"


def _all_doc_commands() -> list[tuple[str, str]]:
    """(where, command) for every command of the README and docs/*.md: ```bash blocks and the
    `$ ` lines of transcripts."""
    out = []
    for path in [README, *sorted(DOCS.glob("*.md"))]:
        for b in blocks(path):
            where = f"{path.relative_to(REPO)} line {b.line}"
            if b.lang == "bash":
                out += [(where, c) for c in b.commands()]
            elif b.lang == "":
                out += [(where, line) for line in b.text.splitlines() if line.startswith("$ ")]
    return out


def test_every_documented_command_line_parses():
    """Also the commands that cannot run here (a GPU, SLURM, the internet): a renamed flag
    breaks the doc, so it breaks this test."""
    bad, n = [], 0
    for where, command in _all_doc_commands():
        for argv in cli_argv(command):
            n += 1
            if (why := parses(argv)) is not None:
                bad.append(f"{where}: ping-llm {shlex.join(argv)}\n    {why}")
    assert n > 50
    assert not bad, "\n".join(bad)


# -- running them ------------------------------------------------------------------------------


@dataclasses.dataclass
class Ran:
    block: str
    written: str
    run: str | None  # None: skipped
    why: tuple[str, ...] = ()  # of each change from the README text
    rc: int | None = None
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""

    def explain(self) -> str:
        changed = "".join(f"\n  changed: {w}" for w in self.why)
        return (f"[{self.block}] {self.run}{changed}\n  exit {self.rc} after "
                f"{self.seconds:.1f} s\n  stderr: ...{self.stderr[-1500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workdir(root: Path, shared: Path) -> dict:
    """The stand-ins for what the README has the reader download (see SAMPLE); returns the
    environment variables the blocks use."""
    with gzip.open(shared / SAMPLE / "raw.jsonl.gz", "rb") as f:
        lines = f.read().splitlines()[::EVERY]
    objs = [orjson.loads(x) for x in lines]
    order = sorted(range(len(objs)), key=lambda i: objs[i]["timestamp"])
    half = len(order) // 2
    for name, part in (("ping-2024-01-01T0000.bz2", order[:half]),
                       ("ping-2024-01-02T0000.bz2", order[half:])):
        (root / name).write_bytes(bz2.compress(b"\n".join(lines[i] for i in part) + b"\n"))
    # mine.json: the results of the (measurement, probe) with the most results, the last 8
    from collections import Counter

    from ping_llm.data.ripe import parse_result

    (msm, prb), _ = Counter((o["msm_id"], o["prb_id"]) for o in objs).most_common(1)[0]
    mine = [objs[i] for i in order if (objs[i]["msm_id"], objs[i]["prb_id"]) == (msm, prb)][-8:]
    (root / "mine.json").write_bytes(orjson.dumps(mine))
    row = parse_result(mine[-1]).rows[0]
    return {"MSM": str(msm), "PRB": str(prb), "SRC": row["src_addr"], "DST": row["dst_addr"]}


def _serve(ran: Ran, cwd: Path, env: dict, port: int, src: str, dst: str) -> dict:
    """Start the server command, wait for /healthz, read /docs (the README's pointer), ask
    /rtt, stop it with SIGINT (Ctrl-C) and expect exit 0. Returns /healthz and /rtt answers."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", "exec " + ran.run], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    answers = {}
    try:
        while "healthz" not in answers:
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                break
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                    answers["healthz"] = json.load(r)
            except OSError:
                time.sleep(0.2)
        if "healthz" in answers:
            with urllib.request.urlopen(base + "/docs", timeout=10) as r:
                answers["docs"] = r.read().decode()
            req = urllib.request.Request(base + "/rtt", headers={"content-type":
                                         "application/json"},
                                         data=json.dumps({"src": src, "dst": dst}).encode())
            with urllib.request.urlopen(req, timeout=60) as r:
                answers["rtt"] = json.load(r)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        ran.rc, ran.stdout, ran.stderr = proc.returncode, out, err
        ran.seconds = time.perf_counter() - t0
    if "healthz" not in answers:
        ran.rc = ran.rc or -1
    return answers


@pytest.fixture(scope="module")
def readme_session(tmp_path_factory, shared_data):
    """Every runnable README block, in README order, in one fresh directory."""
    root = tmp_path_factory.mktemp("readme")
    env = dict(os.environ, **_workdir(root, shared_data))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"  # one thread: 2 shared cores run 2 threads several times slower
    port = _free_port()
    results: dict[str, list[Ran]] = {}
    answers: dict = {}
    for b in readme_bash_blocks():
        found = run_of(b)
        if found is None:
            continue
        name, run = found
        results[name] = []
        for written in b.commands():
            why = tuple(ch.why for ch in run.changes if written.startswith(ch.command))
            ran = Ran(name, written, as_run(written, run, port), why)
            results[name].append(ran)
            if ran.run is None:
                continue
            if any(written.startswith(s) for s in run.background):
                answers[written.split()[1]] = _serve(ran, root, env, port, env["SRC"],
                                                     env["DST"])
            else:
                t0 = time.perf_counter()
                p = subprocess.run(["bash", "-c", "set -euo pipefail\n" + ran.run], cwd=root,
                                   env=env, capture_output=True, text=True, timeout=600)
                ran.rc, ran.stdout, ran.stderr = p.returncode, p.stdout, p.stderr
                ran.seconds = time.perf_counter() - t0
            if ran.rc != 0:
                break
    return root, results, answers


@pytest.mark.slow
def test_readme_real_data_block_runs_end_to_end(readme_session):
    """ingest -> prepare -> train -> calibrate -> eval -> serve, as the README's "Real data"
    section has them, on real RIPE Atlas daily-dump files."""
    root, results, answers = readme_session
    ran = results["real-data"]
    for r in ran:
        assert r.rc == 0, r.explain()
    assert [r.written.split()[1] for r in ran] == ["ingest", "prepare", "train", "calibrate",
                                                   "eval", "serve"]
    assert len(list((root / "data" / "canonical").glob("*.parquet"))) == 2  # one per input
    card = json.loads((root / "data" / "prepared" / "card.json").read_text())
    assert all(card["splits"][s]["measurements"] > 0 for s in card["splits"])
    assert not card["invariants"]["violations"]
    assert (root / "runs" / "small" / "checkpoint" / "model.safetensors").is_file()
    assert (root / "runs" / "small" / "calibration.json").is_file()
    assert (root / "report" / "report.html").is_file()
    assert answers["serve"]["healthz"]["calibrated"] is True
    assert "POST /rtt" in answers["serve"]["docs"]
    assert 0 <= answers["serve"]["rtt"]["p_failed"] <= 1
    # what data.md and queries.md promise about these artefacts
    data_md, queries_md = (DOCS / "data.md").read_text(), (DOCS / "queries.md").read_text()
    assert not [k for k in card if f"`{k}`" not in data_md], "card.json keys not in data.md"
    index = pq.read_schema(root / "data" / "prepared" / "rows" / "train" / "index.parquet")
    assert not [k for k in index.names if f"`{k}`" not in data_md], "index columns"
    assert not [k for k in answers["serve"]["healthz"] if f"`{k}`" not in queries_md]


@pytest.mark.slow
def test_readme_context_block_runs_on_downloaded_atlas_results(readme_session):
    """`--context mine.json` with RIPE Atlas results as the API serves them."""
    _, results, _ = readme_session
    assert all(r.rc == 0 for r in results["real-data"]), "the real-data block failed first"
    ran = results["context-from-atlas"]
    assert [r.run is None for r in ran] == [True, False]  # curl skipped, the query ran
    assert ran[1].rc == 0, ran[1].explain()
    answer = json.loads(ran[1].stdout)
    assert 0 <= answer["p_failed"] <= 1 and answer["median_ms"] > 0 and answer["calibrated"]


# ----------------------------------------------------------------------------------------------
# 3. the contracts live in docs/, and what cites them resolves


def _headings(path: Path) -> list[str]:
    return [title.replace("`", "") for _, title, _ in sections(path)]


def _cited_files() -> list[Path]:
    out = [README, *sorted(DOCS.glob("*.md"))]
    for top in ("src", "tests", "benchmarks", "scripts"):
        out += sorted(p for p in (REPO / top).rglob("*") if p.suffix in (".py", ".sh")
                      and p.is_file() and "egg-info" not in str(p))
    return out


def test_what_cites_docs_resolves():
    """`docs/X.md` names a file; `docs/X.md, "Heading"` (or ("Heading" / "Heading") names the
    start of one of its headings, across comment line breaks."""
    bad = []
    cite = re.compile(r'docs/([\w-]+\.md)(?:(?:,|\s*\(|\s)\s*"([^"]{1,100})")?')
    for path in _cited_files():
        if path == Path(__file__).resolve():  # this file's docstrings show the forms
            continue
        for m in cite.finditer(path.read_text()):
            doc = DOCS / m.group(1)
            where = f"{path.relative_to(REPO)}: {m.group(0)!r}"
            if not doc.is_file():
                bad.append(f"{where}: no such doc")
            elif m.group(2):
                want = re.sub(r"\s*\n\s*(#\s*)?", " ", m.group(2)).strip()
                if not any(h.startswith(want) for h in _headings(doc)):
                    bad.append(f"{where}: {doc.name} has no heading {want!r}")
    assert not bad, "\n".join(bad)


def test_markdown_links_between_docs_resolve():
    bad = []
    for path in [README, *sorted(DOCS.glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*\.md)?(?:#([\w-]+))?\)",
                                         path.read_text()):
            doc = (path.parent / target).resolve() if target else path
            if not doc.is_file():
                bad.append(f"{path.name}: link to {target} (no such file)")
            elif anchor and anchor not in {slug(h) for _, h, _ in sections(doc)}:
                bad.append(f"{path.name}: link to {target}#{anchor} (no such heading)")
    assert not bad, "\n".join(bad)


def test_readme_docs_line_links_every_doc():
    line = README.read_text().split("\nDocs:", 1)[1].split("\n\n", 1)[0]
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", line))
    assert linked == {p.name for p in DOCS.glob("*.md")}


def test_nothing_cites_an_outside_specification():
    """The contracts are the project's own (docs/): no section numbers of an outside spec.
    (Written `S[P]EC` here so that this file does not match the grep it stands for.)"""
    pat = re.compile(r"\bS[P]EC\b|\u00a7")
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in _cited_files()
            for i, line in enumerate(p.read_text().splitlines(), 1) if pat.search(line)]
    assert not hits, "\n".join(hits)


def test_data_doc_names_every_canonical_column_and_reject_reason():
    from ping_llm.data import schema

    data_md = (DOCS / "data.md").read_text()
    table = data_md.split("## The canonical measurement table", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([\w\[\], ]+) \| (yes|no) \|", table, re.M)
    assert [r[0] for r in rows] == schema.CANONICAL_SCHEMA.names
    for name, _, null in rows:
        assert (null == "yes") == schema.CANONICAL_SCHEMA.field(name).nullable, name
    ripe = (REPO / "src/ping_llm/data/ripe.py").read_text()
    ingest = (REPO / "src/ping_llm/data/ingest.py").read_text()
    reasons = set(re.findall(r'Reject\("(\w+)"\)', ripe))
    reasons |= set(re.findall(r'_num\([^()]*, "(\w+)"', ripe))
    reasons |= set(re.findall(r'RejectedResult\("(\w+)"\)', ripe))
    streams = (REPO / "src/ping_llm/data/streams.py").read_text()
    reasons |= set(re.findall(r'"(\w+_file|line_too_long)', ingest + streams))
    reasons |= set(re.findall(r'self\.reject\([^,]+, "(\w+)"', ingest))
    assert len(reasons) > 15
    assert not [r for r in sorted(reasons) if f"`{r}`" not in data_md]
    skipped = set(re.findall(r'skipped\["(\w+)"\]', ripe + ingest))
    assert not [s for s in sorted(skipped) if f"`skipped.{s}`" not in data_md]


def test_queries_doc_names_every_answer_field_endpoint_and_limit():
    import numpy as np

    from ping_llm.query.distribution import RTTDistribution
    from ping_llm.query.limits import Limits
    from ping_llm.query.server import create_app

    queries_md = (DOCS / "queries.md").read_text()
    d = RTTDistribution(0.1, np.array([0x1E1B], np.uint16), np.array([1.0]))
    assert not [k for k in d.to_dict() if f"`{k}`" not in queries_md]
    assert not [f.name for f in dataclasses.fields(Limits)
                if f"--{f.name.replace('_', '-')}" not in queries_md]
    app = create_app(engine=None)  # the routes, without a model
    routes = [(m, r.path) for r in app.routes for m in getattr(r, "methods", ())
              if m in ("GET", "POST")]
    assert len(routes) >= 8
    assert not [f"{m} {p}" for m, p in routes if f"`{m} {p}`" not in queries_md]
