"""The leak check of the evaluation: a model may only be scored on data it never saw.

Split invariants (`data.splits.split_invariants`, run by prepare on the splits it writes and by eval
on the splits it reads): no test_probe or val_probe probe in train (or val, or the other cold-start
split) under any address, and no such source address there under another probe; no test_pair (probe,
destination) pair in train or val; no test or val measurement in train. A probe is its prb_id where
the table has one, else its source address (the key prepare splits on).

Rules for a run. The run must record the fingerprint of its train split (prepare's sha256 over
the split's content); it must equal this dataset card's train fingerprint, and may not equal any
test split's. The splits' content is then checked for exact shared measurements
(event_time, src, dst, rtt) against train (prepare guarantees none; external sets may have
some: refused). `allow_foreign_run` accepts a run trained on another dataset only if that
dataset is still on disk with the recorded fingerprint and none of its train measurements is
in the evaluated sets (checked on content). A run started from another (`train --init-from`)
records its lineage, a run trained on a mixture its other datasets, and every ancestor and
dataset is held to the same rule: trained on this dataset's
train split, or on data still on disk that shares nothing with the evaluated sets — no
measurement, and no probe of test_probe or val_probe nor (probe, destination) pair of
test_pair (the split invariants, across datasets). Any failure raises InputError (CLI exit 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ping_llm.data.splits import COLD_SPLITS, split_invariants
from ping_llm.errors import InputError

_KEYS = ("event_time", "src_addr", "dst_addr", "rtt")


def recorded_train_fingerprint(run_config: dict) -> str | None:
    """The train-split fingerprint a run recorded: a `train_fingerprint` key anywhere in its
    config, or `fingerprint` under a `train` entry of a recorded card's `splits`."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("lineage", "mixture"):  # other data: checked one by one (check_leak)
                    continue
                in_card = key == "fingerprint" and path[-2:] == ("splits", "train")
                if isinstance(value, str) and (key == "train_fingerprint" or in_card):
                    found.append(value)
                else:
                    walk(value, path + (key,))

    walk(run_config, ())
    if len(set(found)) > 1:
        raise InputError(f"the run records several train fingerprints {sorted(set(found))}")
    return found[0] if found else None


def content_overlap(a: pa.Table, b: pa.Table) -> int:
    """Rows of `a` whose (event_time, src, dst, rtt) also occurs in `b` (exact match)."""
    if a.num_rows == 0 or b.num_rows == 0:
        return 0
    left = a.select(list(_KEYS)).append_column("_n", pa.array(np.ones(a.num_rows, np.int8)))
    right = b.select(list(_KEYS)).group_by(list(_KEYS)).aggregate([])
    return left.join(right, list(_KEYS), join_type="inner").num_rows


def check_leak(card: dict, run_config: dict, train: pa.Table, test_sets: dict, *,
               external: bool = False, allow_foreign_run: bool = False) -> dict:
    """Refuse (InputError) a run whose training data may overlap the evaluated sets (name ->
    canonical table); returns what was checked. The rules are in the module docstring."""
    card_fp = card["splits"]["train"]["fingerprint"]
    run_fp = recorded_train_fingerprint(run_config)
    test_fps = {s: v["fingerprint"] for s, v in card["splits"].items()
                if s != "train" and v.get("measurements")}
    info = {"dataset_train_fingerprint": card_fp, "run_train_fingerprint": run_fp,
            "test_fingerprints": test_fps, "mode": "fingerprint", "overlap": {}}
    hit = [s for s, fp in test_fps.items() if fp == run_fp]
    if hit:
        raise InputError(f"leak: the run was trained on the {hit[0]} split of this dataset "
                         f"(fingerprint {run_fp}); refusing to evaluate on it")
    if run_fp != card_fp:
        why = ("the run records no train-split fingerprint (config.json), so nothing proves it "
               "never saw the test measurements" if run_fp is None else
               f"the run was trained on a different dataset (train fingerprint {run_fp}, this "
               f"dataset's is {card_fp})")
        if not allow_foreign_run:
            raise InputError(f"leak check: {why}. Evaluate it on the dataset it was trained on, "
                             "or pass --allow-foreign-run to check overlap on content")
        foreign = _foreign_train(run_config, run_fp, why)
        info["mode"] = "content (foreign run)"
        info["foreign_train_measurements"] = foreign.num_rows
        for name, tbl in test_sets.items():
            n = content_overlap(tbl, foreign)
            info["overlap"][f"{name} vs run train"] = n
            if n:
                raise InputError(f"leak: {n} measurements of {name} are in the train split the "
                                 "run was trained on; refusing to evaluate on them")
    for name, tbl in test_sets.items():
        n = content_overlap(tbl, train)
        info["overlap"][f"{name} vs dataset train"] = n
        if n:
            what = "the external set" if external else f"split {name}"
            raise InputError(f"leak: {n} measurements of {what} are also in this dataset's train "
                             "split (the model trained on them); remove them first")
    # the other datasets it trained on, and the runs it started from (nearest first)
    for parent in [*run_config.get("mixture", []), *run_config.get("lineage", [])]:
        _check_parent(parent, card_fp, test_fps, test_sets, info)
    if not external:  # the dataset's own splits: their invariants, checked again on the data
        inv = split_invariants({"train": train, **test_sets})
        info["split_invariants"] = inv
        if inv["violations"]:
            what = ", ".join(f"{n} {k}" for k, n in inv["violations"].items())
            raise InputError(f"leak: the dataset's splits break the split invariants ({what}); "
                             "prepare it again with this version")
    return info


def _check_parent(parent: dict, card_fp: str, test_fps: dict, test_sets: dict, info: dict):
    """A run's ancestor (`--init-from`) may not have seen the evaluated measurements either: on
    this dataset it must have trained on its train split; on another, its data must still be on
    disk and share no measurement with the evaluated sets (checked on content)."""
    fp = parent.get("fingerprint")
    where = (f"{parent['run']} (step {parent.get('step')})" if "run" in parent
             else f"the dataset {parent.get('data_dir')}")
    hit = [s for s, f in test_fps.items() if f == fp]
    if hit:
        raise InputError(f"leak: the run learnt from {where}, which is (or was trained on) the "
                         f"{hit[0]} split of this dataset; refusing to evaluate on it")
    if fp == card_fp:
        info.setdefault("lineage", []).append({"source": where, "mode": "fingerprint"})
        return
    train = _foreign_train({"train": {"data_dir": parent.get("data_dir")}}, fp,
                           f"the run learnt from {where}, another dataset")
    for name, tbl in test_sets.items():
        n = content_overlap(tbl, train)
        if n:
            raise InputError(f"leak: {n} measurements of {name} are in the data of {where}, "
                             "which the run learnt from; refusing to evaluate")
    # Another dataset may hold the same probes (another campaign of the same platform): then
    # test_probe's (val_probe's) probes are not new to the model, nor test_pair's pairs unseen.
    held = {n: t for n, t in test_sets.items() if n in (*COLD_SPLITS, "test_pair")}
    bad = split_invariants({"train": train, **held})["violations"] if held else {}
    if bad:
        what = ", ".join(f"{n} {k.replace(' in train', '')}" for k, n in bad.items())
        raise InputError(f"leak: {what} are in the data of {where}, which the run learnt from "
                         "(they are not new to it); evaluate the other splits, or prepare those "
                         "datasets together so that their splits agree")
    info.setdefault("lineage", []).append({"source": where, "mode": "content"})


def _foreign_train(run_config: dict, run_fp, why: str) -> pa.Table:
    from ping_llm.data.prepare import load_card
    from ping_llm.data.schema import read_canonical

    data_dir = (run_config.get("train") or {}).get("data_dir")
    if run_fp is None or not data_dir:
        raise InputError(f"leak check: {why}, and the run does not say where its training data "
                         "is, so overlap cannot be checked: refusing")
    try:
        card = load_card(data_dir)
    except InputError as e:
        raise InputError(f"leak check: {why}; its dataset {data_dir} is unreadable ({e})") from None
    if card["splits"]["train"]["fingerprint"] != run_fp:
        raise InputError(f"leak check: {why}; {data_dir} no longer holds the train split the run "
                         "was trained on (fingerprint differs): refusing")
    return read_canonical(Path(data_dir) / card["splits"]["train"]["parquet"])
