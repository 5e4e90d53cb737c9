"""leakcheck: exact-content overlap and the train fingerprint a run records. (That eval refuses
leaky runs end to end is tested in test_evaluate.py.)"""

from __future__ import annotations

import pytest

from ping_llm.errors import InputError
from ping_llm.eval import leakcheck as L


def test_content_overlap_counts_exact_measurements(canonical_table):
    a = canonical_table([("1.0.0.1", "2.0.0.1", 10.0, 100), ("1.0.0.1", "2.0.0.1", 10.5, 100),
                ("1.0.0.1", "2.0.0.1", -1.0, 200)])
    b = canonical_table([("1.0.0.1", "2.0.0.1", 10.0, 100), ("1.0.0.1", "2.0.0.1", -1.0, 200),
                ("1.0.0.1", "2.0.0.1", -1.0, 200)])
    assert L.content_overlap(a, b) == 2
    assert L.content_overlap(a, b.slice(0, 0)) == 0


def test_recorded_fingerprint_is_found_in_either_layout():
    assert L.recorded_train_fingerprint({"dataset": {"train_fingerprint": "sha256:a"}}) \
        == "sha256:a"
    card_like = {"data": {"card": {"splits": {"train": {"fingerprint": "sha256:b"},
                                              "test_time": {"fingerprint": "sha256:c"}}}}}
    assert L.recorded_train_fingerprint(card_like) == "sha256:b"
    assert L.recorded_train_fingerprint({"train": {"data_dir": "x"}}) is None
    with pytest.raises(InputError):
        L.recorded_train_fingerprint({"a": {"train_fingerprint": "x"},
                                       "b": {"train_fingerprint": "y"}})



# ------------------------------------------------------------------------------------------------
# a run started from another (`train --init-from`): every ancestor is checked too


def _card(train_fp="sha256:train", **tests):
    splits = {"train": {"fingerprint": train_fp, "measurements": 1}}
    splits.update({k: {"fingerprint": v, "measurements": 1} for k, v in tests.items()})
    return {"splits": splits}


def test_a_parent_trained_on_a_test_split_makes_the_child_a_leak(canonical_table):
    train = canonical_table([("1.0.0.1", "2.0.0.1", 10.0, 100)])
    test = {"test_probe": canonical_table([("1.0.0.9", "2.0.0.5", 20.0, 900)])}
    card = _card(test_probe="sha256:probe")
    child = {"dataset": {"train_fingerprint": "sha256:train"}}
    ok = L.check_leak(card, {**child, "lineage": [{"run": "p", "fingerprint": "sha256:train"}]},
                      train, test, external=True)
    assert ok["lineage"] == [{"source": "p (step None)", "mode": "fingerprint"}]
    leaky = {**child, "lineage": [{"run": "p", "step": 9, "fingerprint": "sha256:train"},
                                  {"run": "gp", "step": 3, "fingerprint": "sha256:probe"}]}
    with pytest.raises(InputError, match=r"learnt from gp \(step 3\).*test_probe split"):
        L.check_leak(card, leaky, train, test, external=True)
    nowhere = {**child, "lineage": [{"run": "p", "fingerprint": "sha256:else"}]}
    with pytest.raises(InputError, match="does not say where its training data is"):
        L.check_leak(card, nowhere, train, test, external=True)


def test_a_parent_from_another_dataset_is_checked_on_its_content(trained_run, canonical_table):
    from ping_llm.data.prepare import load_card
    from ping_llm.data.schema import read_canonical

    other = load_card(trained_run.data_dir)
    other_train = read_canonical(trained_run.data_dir / other["splits"]["train"]["parquet"])
    parent = {"run": "pretrained", "step": 5, "data_dir": str(trained_run.data_dir),
              "fingerprint": other["splits"]["train"]["fingerprint"]}
    child = {"dataset": {"train_fingerprint": "sha256:train"}, "lineage": [parent]}
    train = canonical_table([("1.0.0.1", "2.0.0.1", 10.0, 100)])
    clean = {"test_pair": canonical_table([("1.0.0.9", "2.0.0.5", 20.0, 900)])}
    info = L.check_leak(_card(test_pair="sha256:pair"), child, train, clean, external=True)
    assert info["lineage"] == [{"source": "pretrained (step 5)", "mode": "content"}]
    seen = {"test_pair": other_train.slice(0, 3)}  # measurements the parent trained on
    with pytest.raises(InputError, match="3 measurements of test_pair are in the data of pre"):
        L.check_leak(_card(test_pair="sha256:pair"), child, train, seen, external=True)
    mixed = {"dataset": {"train_fingerprint": "sha256:train"},  # trained on it alongside
             "mixture": [{k: parent[k] for k in ("data_dir", "fingerprint")}]}
    with pytest.raises(InputError, match="in the data of the dataset"):
        L.check_leak(_card(test_pair="sha256:pair"), mixed, train, seen, external=True)


def test_a_dataset_learnt_alongside_may_not_hold_the_held_out_probes(trained_run,
                                                                     canonical_table):
    # Another campaign of the same platform shares probes: a probe it trained on is not new to
    # the model, even when none of the evaluated measurements is in that data.
    import pyarrow as pa
    import pyarrow.compute as pc

    from ping_llm.data.prepare import load_card
    from ping_llm.data.schema import read_canonical

    other = load_card(trained_run.data_dir)
    other_train = read_canonical(trained_run.data_dir / other["splits"]["train"]["parquet"])
    mixed = {"dataset": {"train_fingerprint": "sha256:train"},
             "mixture": [{"data_dir": str(trained_run.data_dir),
                          "fingerprint": other["splits"]["train"]["fingerprint"]}]}
    train = canonical_table([("1.0.0.1", "2.0.0.1", 10.0, 100)])
    row = other_train.slice(0, 1)  # the same probe and addresses, a measurement never made
    later = row.set_column(row.schema.get_field_index("rtt"), "rtt",
                           pc.add(row["rtt"], pa.scalar(1234.5)))
    with pytest.raises(InputError, match="1 test_probe probes, 1 test_probe source addresses "
                                         "are in the data of the dataset"):
        L.check_leak(_card(test_probe="sha256:probe"), mixed, train, {"test_probe": later},
                     external=True)
    # nor to val_probe's: what cold-start defaults are chosen on must be new probes too
    with pytest.raises(InputError, match="1 val_probe probes, 1 val_probe source addresses"):
        L.check_leak(_card(val_probe="sha256:vprobe"), mixed, train, {"val_probe": later},
                     external=True)
    # the same row as a test_time measurement is fine: known probes are what test_time asks about
    info = L.check_leak(_card(test_time="sha256:time"), mixed, train, {"test_time": later},
                        external=True)
    assert info["lineage"] == [{"source": f"the dataset {trained_run.data_dir}",
                                "mode": "content"}]
