"""data.splits: the split invariants are checked on the probe, never on its address."""

from __future__ import annotations

from ping_llm.data.splits import split_invariants


def test_split_invariants_key_on_the_probe_not_its_address(canonical_table):
    import pyarrow as pa

    def with_probe(rows, prb):
        t = canonical_table(rows)
        return t.append_column("prb_id", pa.array(prb, pa.int64()))

    # probe 7 renumbers from 1.0.0.1 (train) to 1.0.0.9 (test_probe): a leak under a new address
    train = with_probe([("1.0.0.1", "2.0.0.1", 10.0, 100), ("1.0.0.2", "2.0.0.2", 11.0, 100)],
                       [7, 8])
    test_probe = with_probe([("1.0.0.9", "2.0.0.1", 10.2, 500)], [7])
    test_pair = with_probe([("1.0.0.5", "2.0.0.2", 12.0, 300)], [8])  # probe 8 -> 2.0.0.2 again
    inv = split_invariants({"train": train, "test_probe": test_probe, "test_pair": test_pair})
    assert inv["violations"] == {"test_probe probes in train": 1,
                                 "test_pair (probe, dst) pairs in train": 1}
    # val is what defaults are chosen on: held-out probes and pairs must stay out of it too
    inv = split_invariants({"train": train.slice(1), "val": train.slice(0, 1),
                              "test_probe": test_probe})
    assert inv["violations"] == {"test_probe probes in val": 1}
    # val_probe is the cold start chosen on: out of train, and sharing no probe with test_probe
    inv = split_invariants({"train": train, "val_probe": train.slice(1)})
    assert inv["violations"] == {"val_probe probes in train": 1,
                                 "val_probe source addresses in train": 1,
                                 "val_probe measurements in train": 1}
    inv = split_invariants({"train": train.slice(1), "val_probe": test_probe,
                              "test_probe": test_probe})
    assert inv["violations"] == {"test_probe probes in val_probe": 1,
                                 "test_probe source addresses in val_probe": 1}
    # without prb_id the address is the probe: then the same rows hold no probe leak
    inv = split_invariants({"train": train.drop_columns(["prb_id"]),
                              "test_probe": test_probe.drop_columns(["prb_id"])})
    assert inv["violations"] == {}
    # a shared NAT address is a leak of cold start even across probes; exact rows are counted
    other = with_probe([("1.0.0.2", "2.0.0.9", 30.0, 900), ("1.0.0.1", "2.0.0.1", 10.0, 100)],
                       [9, 9])
    inv = split_invariants({"train": train, "test_probe": other})
    assert inv["checked"]["test_probe probes in train"] == 0
    assert inv["violations"] == {"test_probe source addresses in train": 2,
                                 "test_probe measurements in train": 1}
