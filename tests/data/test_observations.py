"""The train split baselines fit on: built from a canonical table or from arrays, validated."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from ping_llm.data.observations import Observations
from ping_llm.errors import InputError


def test_observations_from_a_canonical_table_converts_timestamps_to_seconds():
    t = pa.table({
        "event_time": pa.array([1_000_000, 2_000_000], pa.timestamp("ms", tz="UTC")),
        "src_addr": ["1.1.1.1", "1.1.1.1"], "dst_addr": ["2.2.2.2", "3.3.3.3"],
        "rtt": [5.0, -1.0], "extra": [1, 2]})
    obs = Observations.from_table(t)
    np.testing.assert_array_equal(obs.time, [1000.0, 2000.0])
    np.testing.assert_array_equal(obs.ok, [True, False])
    assert list(obs.nodes) == ["1.1.1.1", "2.2.2.2", "3.3.3.3"]
    with pytest.raises(InputError, match="lacks"):
        Observations.from_table(t.drop(["rtt"]))


def test_observations_reject_mismatched_lengths_and_nan_rtts():
    with pytest.raises(InputError):
        Observations(["a"], ["b", "c"], [1.0, 2.0])
    with pytest.raises(InputError):
        Observations(["a"], ["b"], [np.nan])
