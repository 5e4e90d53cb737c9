"""Shared fixtures: the real RIPE Atlas samples (../shared/data beside the repo), and a tiny model
trained once per test session on a small synthetic Internet, through the real pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"real data not found at {SHARED_DATA} (expected ../shared/data beside the repo)"
        )
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a shared 2-core box, 2 threads contending are ~4x
    slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def canonical_table():
    """Build a small canonical table: canonical_table([(src, dst, rtt_ms, epoch_s), ...])."""
    import pyarrow as pa

    def make(rows):
        src, dst, rtt, t = zip(*rows, strict=True)
        return pa.table({"event_time": pa.array(t, pa.int64()).cast(pa.timestamp("s", tz="UTC")),
                         "src_addr": list(src), "dst_addr": list(dst),
                         "ip_version": pa.array([4] * len(rows), pa.int8()),
                         "rtt": pa.array(rtt, pa.float64())})

    return make


@dataclass(frozen=True)
class TrainedRun:
    run_dir: Path  # checkpoint directory (config.json, model.safetensors, meta.json, ...)
    data_dir: Path  # the prepared dataset it was trained on (card.json, splits/, rows/)
    results: Path  # the synthetic RIPE-format results; the world is in results + ".world.json"
    canonical: Path  # ingested canonical Parquet


# A world small enough to build, ingest, prepare and train on in about a minute on 2 cores, and a
# model trained long enough that its predictions depend on the addresses (loss well below the
# unigram baseline), though far from converged.
TRAINED_RUN_WORLD = dict(seed=7, probes=24, days=1.0)
TRAINED_RUN_MODEL = {"sequence_len": 256}
TRAINED_RUN_STEPS = 150


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    import torch

    from ping_llm import train as tr
    from ping_llm.data import ingest, prepare, synth, synth_atlas

    root = tmp_path_factory.mktemp("trained_run")
    results = root / "results.jsonl.gz"
    synth_atlas.generate(synth.SynthConfig(**TRAINED_RUN_WORLD), results, progress=False)
    canonical = root / "canonical"
    rep = ingest.ingest([results], canonical, progress=False)
    assert rep.rejected == 0
    data_dir = root / "dataset"
    # a quarter of the probes held out, so the small world still has a cold-start split
    prepare.prepare([canonical], data_dir, prepare.PrepareConfig(seed=0, probe_fraction=0.25),
                    progress=False)
    run_dir = root / "run"
    # One thread: on two cores shared with anything else, torch's two threads oversubscribe and
    # run many times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = tr.train(
            tr.TrainConfig(
                data_dir=str(data_dir),
                out_dir=str(run_dir),
                model=TRAINED_RUN_MODEL,
                steps=TRAINED_RUN_STEPS,
                device_batch_size=8,
                warmup_steps=10,
                eval_every=TRAINED_RUN_STEPS,
                eval_batches=4,
                save_every=0,
                log_every=50,
                device="cpu",
                geo_db=str(synth.geo_db_path(results)),  # as the demo: the world's own database
            )
        )
    finally:
        torch.set_num_threads(threads)
    assert summary["completed"]
    return TrainedRun(run_dir=run_dir, data_dir=data_dir, results=results, canonical=canonical)
