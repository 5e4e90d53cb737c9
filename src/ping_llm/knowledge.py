"""Address knowledge: what a geolocation database says about an address, as model inputs.

The model reads addresses as bytes, so on its own it knows an address only through the
measurements it has seen of it (and of its prefixes: see `model.prefix_slots`). A MaxMind
database (`ping_llm.data.geo.GeoDB`, by default the GeoLite2-City build the geolocation baseline
uses) knows roughly where almost every public address is: that is what lets a model say something
about a probe or a destination it has never seen. The token language does not change; the
features are added to the embedding of the byte that completes an address (source or
destination), so everything after that byte -- the other address, the timestamp, the RTT -- can
read them, and nothing before it can (the address's own bytes stay predicted without them, as
`query destinations` needs).

Per address, from `GeoDB.locate`:
- dense (DENSE_DIM floats): found (1/0); the unit vector of the location (x, y, z); sin and cos
  of latitude and longitude at FREQUENCIES (1x .. 32x: from hemispheres down to ~600 km, a
  smooth encoding in which nearby places have nearby features); log(1 + accuracy radius km) / 7
  (0..~1). An address the database does not place gets zeros with found = 0.
- ids (3 rows of one embedding table, KNOWLEDGE_VOCAB rows, row 0 = unknown): the country (ISO
  3166 alpha-2 code, one row per letter pair), the continent, and the ASN hashed into ASN_BUCKETS
  rows (GeoLite2-City has no ASN, so the ASN row is 0 there; an ASN database fills it).

The same function serves training (a batch's tokens, on the CPU beside the loader), eval and
every query path (through `GPT.forward`, which gives it the cached tokens before new ones), so
the features of an address cannot differ between them. A run records the database it trained
with (`describe`), and `checkpoint.load_model` refuses a different one.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ping_llm import tokens as tk
from ping_llm.data.geo import GeoDB

FREQUENCIES = (1, 2, 4, 8, 16, 32)
DENSE_DIM = 1 + 3 + 4 * len(FREQUENCIES) + 1
CONTINENTS = ("AF", "AN", "AS", "EU", "NA", "OC", "SA")
ASN_BUCKETS = 4096
_COUNTRY0 = 1  # rows of the id table: 0 unknown | countries | continents | ASN buckets
_CONTINENT0 = _COUNTRY0 + 26 * 26
_ASN0 = _CONTINENT0 + len(CONTINENTS)
KNOWLEDGE_VOCAB = _ASN0 + ASN_BUCKETS
N_IDS = 3


def _country_row(code: str) -> int:
    if len(code) != 2 or not code.isascii() or not code.isalpha():
        return 0
    a, b = (ord(ch) - ord("A") for ch in code.upper())
    return _COUNTRY0 + 26 * a + b


def encode(info: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`GeoDB.locate`'s columns for N addresses -> (dense (N, DENSE_DIM) float32, ids (N, 3))."""
    found = info["found"]
    lat = np.radians(np.where(found, info["lat"], 0.0))
    lon = np.radians(np.where(found, info["lon"], 0.0))
    cols = [np.ones_like(lat), np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)]
    for f in FREQUENCIES:
        cols += [np.sin(f * lat), np.cos(f * lat), np.sin(f * lon), np.cos(f * lon)]
    radius = np.nan_to_num(info["accuracy_radius_km"], nan=1000.0)
    cols.append(np.log1p(radius) / 7.0)
    dense = np.stack(cols, axis=1) * found[:, None]  # (N, DENSE_DIM); zeros where not found
    country = np.array([_country_row(c) for c in info["country"]], np.int64)
    continent = np.array([_CONTINENT0 + CONTINENTS.index(c) if c in CONTINENTS else 0
                          for c in info["continent"]], np.int64)
    asn = np.where(info["asn"] > 0, _ASN0 + info["asn"] % ASN_BUCKETS, 0)
    return dense.astype(np.float32), np.stack([country, continent, asn], axis=1)


def drop(feats: tuple[torch.Tensor, torch.Tensor], frac: float,
         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training's knowledge dropout: each row (context) of a batch's features (dense (B, T, D),
    ids (B, T, K)) is, with probability frac, read as if the database placed none of its
    addresses (zeros, id row 0: what an unplaced address gets). The rows are drawn from `seed`
    alone, so a batch's dropout is a pure function of its seed (exact resume, any world size)."""
    dense, ids = feats
    gen = torch.Generator().manual_seed(seed)
    keep = (torch.rand(dense.shape[0], generator=gen) >= frac).to(dense.device)  # (B,)
    return dense * keep[:, None, None], ids * keep[:, None, None]


def _keys(addr: np.ndarray, version: np.ndarray, tail: bool = False) -> list[bytes]:
    """Lookup keys (version byte + address bytes) of addresses as uint8 rows (N, 16): the
    address is the rows' first bytes (`tokens.parse_addresses`), or their last with tail."""
    return [bytes([v]) + (a[-tk.ADDRESS_BYTES[v]:] if tail else a[:tk.ADDRESS_BYTES[v]]).tobytes()
            for v, a in zip(version, addr, strict=True)]


class AddressKnowledge:
    """Knowledge features of token streams from one database (memoised per address)."""

    def __init__(self, db: GeoDB):
        self.db = db
        self._memo: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        self._alias: dict[bytes, bytes] = {}

    @classmethod
    def open(cls, path=None) -> AddressKnowledge:
        """The packaged GeoLite2-City (path None) or any MaxMind database file."""
        return cls(GeoDB.open(path))

    def describe(self) -> dict:
        """What a run records: name, build date, sha256 (and the attribution)."""
        return self.db.describe()

    @contextlib.contextmanager
    def aliases(self, new, real):
        """While open, each address of `new` (strings) reads the features of the address of `real`
        at the same index: a re-addressed source keeps its real location, as training's
        `readdress_knowledge` gives it and as a real new probe has one (`eval
        --readdress-sources`, `calibrate`)."""
        keys = [_keys(*tk.parse_addresses(a)) for a in (new, real)]
        saved, self._alias = self._alias, {**self._alias, **dict(zip(*keys, strict=True))}
        try:
            yield self
        finally:
            self._alias = saved

    def lookup(self, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Features of addresses given as version byte + address bytes -> (dense, ids)."""
        if self._alias:
            keys = [self._alias.get(k, k) for k in keys]
        new = [k for k in dict.fromkeys(keys) if k not in self._memo]
        if new:
            text = [tk.format_address(k[1:], k[0]) for k in new]
            dense, ids = encode(self.db.locate(text))
            self._memo.update(zip(new, zip(dense, ids, strict=True), strict=True))
        rows = [self._memo[k] for k in keys]
        if not rows:
            return np.zeros((0, DENSE_DIM), np.float32), np.zeros((0, N_IDS), np.int64)
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def features(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) -> (dense (B, T, DENSE_DIM) float32, ids (B, T, 3) int64), non-zero
        only at the byte that completes an address; CPU tensors."""
        idx = idx.cpu()
        B, T = idx.shape
        dense = torch.zeros((B, T, DENSE_DIM), dtype=torch.float32)
        ids = torch.zeros((B, T, N_IDS), dtype=torch.int64)
        version, n = tk.address_progress(idx)
        at = tk.address_complete(version, n)
        b, t = at.nonzero(as_tuple=True)
        if len(b) == 0:
            return dense, ids
        back = torch.arange(tk.ADDRESS_LOOKBACK - 1, -1, -1)  # (16,) offsets, oldest first
        window = idx[b[:, None], (t[:, None] - back).clamp(min=0)] - tk.BYTE0  # (N, 16)
        window = window.numpy().astype(np.uint8)
        d, i = self.lookup(_keys(window, version[b, t].numpy(), tail=True))
        dense[b, t] = torch.from_numpy(d)
        ids[b, t] = torch.from_numpy(i)
        return dense, ids
