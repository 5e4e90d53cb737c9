"""leakcheck: exact-content overlap and the train fingerprint a run records. (That eval refuses
leaky runs end to end is tested in test_evaluate.py.)"""

from __future__ import annotations

import pytest

from ping_llm import leakcheck as L
from ping_llm.errors import InputError


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
