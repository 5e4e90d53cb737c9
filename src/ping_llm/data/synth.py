"""The synthetic Internet: a seeded world of probes and destinations with exact ground truth.

Why: real RIPE Atlas data has no ground truth, so a model can only be scored against noisy held-out
samples. Here every (source, destination, time) has an exact RTT distribution and failure
probability, so a model's predicted distribution can be scored by KL divergence to the truth, and
the RIPE Atlas JSON generated from it exercises `ingest` end to end. It is the default data of the
main job and tests. This module is the world and its truth (`World`, `Truth`, `SynthConfig`); the
measurement schedules and the JSON writer (`generate`, `ping-llm synth`) are in `synth_atlas`.

The world: real cities (data/cities.csv); networks (ASes) with an IPv4 /16 and an IPv6 /32
from their region's registry and one IPv4 /20 and IPv6 /40 per city they serve, so an address's
leading bytes say where it is. Probes are mostly NAT'd home connections (private `src_addr`, public
`from`, which some renumber every few days) plus datacenter anchors. Destinations are anchors,
unicast servers and anycast services (one address, answered by the site BGP picks: usually the
nearest). One packet from s to d at time t takes

    RTT = loc + scale * X,  X ~ (1 - w) LogNormal(0, sigma) + w Pareto(xm, alpha) (truncated)
    loc = 2 km inflation / (2/3 c) + access(s) + access(d) + congestion * load(local hour)
          [+ a route-change level shift in some 6-hour epochs]

with km the great-circle distance plus metro fibre (via a distant exchange for networks that
"trombone"), inflation per network pair (worse on some IPv6 paths), and a load that peaks in the
probe's local evening, widening the jitter and raising loss too. A packet is lost with probability
1 - (1 - icmp_filter(d)) (1 - outage(s, t)) (1 - loss(s, d, t)); packets are independent given
(s, d, t). The jitter CDF is closed-form, so the truth is exact on the token RTT grid
(`Truth.pdf_codes`). Pairwise properties are hashes of (seed, keys), not stored matrices, so truth
for any pair costs O(1) and a world rebuilds from its config alone (`World.load`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from scipy.special import ndtr

from ping_llm.errors import InputError

KM_PER_MS = 299_792.458e-3 * 2 / 3  # one-way distance light covers in fibre per ms (~200 km)
HOME, ANCHOR, SERVER, ANYCAST = 0, 1, 2, 3
KIND_NAMES = ("home", "anchor", "server", "anycast")
RIRS = ("RIPE", "ARIN", "APNIC", "LACNIC", "AFRINIC")
# First IPv4 octets each registry hands out (documentation/special ranges avoided), IPv6 /12s.
_V4_OCTETS = (
    (2, 5, 31, 37, 46, 62, *range(77, 96), 109, 176, 178, 185, 188, 193, 194, 195, 212, 213, 217),
    (23, 24, 50, *range(63, 77), 96, 97, 98, 99, 104, 107, 108, 173, 184, 199, 204, 206, 207, 208),
    (1, 14, 27, 36, 39, 42, 49, 58, 59, 60, 61, 101, 103, *range(110, 126), 175, 180, 182, 202),
    (177, 179, 181, 186, 187, 189, 190, 191, 200, 201),
    (41, 102, 105, 154, 196, 197),
)
_V6_TOP = (0x2A00, 0x2600, 0x2400, 0x2800, 0x2C0F)
# Local-hour load profile (0 = idle, 1 = evening peak), interpolated; drives congestion and loss.
_DIURNAL = np.array([.55, .35, .2, .1, .05, .05, .08, .15, .25, .3, .33, .35,
                     .38, .38, .38, .4, .45, .55, .68, .82, .95, 1., .92, .75])
# Home access technologies: share, access RTT ms, jitter ms, congestion ms, loss, tail weight.
_TECH = np.array([[.35, 1.5, .2, .8, .002, .01],   # fibre
                  [.30, 8., 1., 4., .005, .03],    # cable
                  [.25, 14., .8, 3., .008, .02],   # DSL
                  [.10, 35., 6., 12., .02, .05]])  # LTE / fixed wireless
# Atlas probe firmware a result reports as (fw, mver); World.fw indexes it per probe.
FIRMWARE = ((5020, "2.2.1"), (5060, "2.4.1"), (5080, "2.6.2"))


@dataclass(frozen=True)
class SynthConfig:
    """Size and behaviour of the synthetic Internet; the defaults are the embedded default world."""

    seed: int = 0
    probes: int = 120  # RIPE-Atlas-like probes, anchors included
    days: float = 2.0
    start: int = 1_704_067_200  # epoch seconds of the first measurement (2024-01-01T00:00:00Z)
    anchor_frac: float = 0.1  # probes that are datacenter anchors (public src_addr, targets; >= 1)
    servers_per_probe: float = 2.0  # unicast destinations per probe
    anycast_services: int = 6
    builtin_services: int = 1  # anycast services every probe pings every 240 s (like msm 1001)
    user_msms_per_probe: float = 3.0  # user-defined measurements per probe
    mesh_step: int = 900  # anchoring-mesh interval, s
    dual_stack_frac: float = 0.4  # home probes with IPv6 (anchors 90%, servers 50%)
    renumber_frac: float = 0.3  # home probes whose public address changes every 1-14 days
    outages_per_day: float = 0.25  # per home probe: windows in which every packet is lost
    filtered_frac: float = 0.04  # servers that drop all ICMP (another 2x rate-limit it)
    route_change_prob: float = 0.03  # per pair and 6-hour epoch: a level shift of 5-45 ms
    jitter_sigma: float = 0.8  # log-sd of the lognormal jitter body (median = the jitter scale)
    tail_alpha: float = 1.5  # Pareto tail index of bufferbloat spikes (> 1: finite mean)
    tail_xm: float = 3.0  # spikes start at this multiple of the median jitter
    tail_max_ms: float = 3000.0  # and are truncated here (real Atlas RTTs rarely exceed seconds)

    def __post_init__(self):
        def need(ok, what):
            if not ok:
                raise InputError(f"synth config: {what}")

        need(isinstance(self.seed, int) and self.seed >= 0, f"seed must be >= 0: {self.seed}")
        need(2 <= self.probes <= 20_000, f"probes must be in [2, 20000]: {self.probes}")
        need(0 < self.days <= 366, f"days must be in (0, 366]: {self.days}")
        need(0 <= self.start < 2**32, f"start must be epoch seconds: {self.start}")
        need(self.mesh_step >= 60, f"mesh_step must be >= 60 s: {self.mesh_step}")
        need(1 <= self.anycast_services <= 12, "anycast_services must be in [1, 12]")
        need(0 <= self.builtin_services <= self.anycast_services, "builtin_services > anycast")
        need(self.tail_alpha > 1 and self.tail_xm > 0 and self.jitter_sigma > 0, "bad jitter law")
        need(self.tail_max_ms > 0, "tail_max_ms must be > 0")
        need(self.servers_per_probe > 0 and self.user_msms_per_probe >= 0, "negative sizes")
        for f in ("anchor_frac", "dual_stack_frac", "renumber_frac", "filtered_frac",
                  "route_change_prob"):
            need(0 <= getattr(self, f) <= 1, f"{f} must be in [0, 1]")
        need(self.outages_per_day >= 0, "outages_per_day must be >= 0")


# ----------------------------------------------------------------------------------------------
# helpers


def _u01(seed: int, salt: int, *keys) -> np.ndarray:
    """Deterministic uniforms in [0, 1) from integer keys (splitmix64), broadcast over keys."""
    keys = np.broadcast_arrays(*[np.asarray(k, dtype=np.int64) for k in keys])
    h = np.full(keys[0].shape, (seed * 0x9E3779B97F4A7C15 + salt) % 2**64, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in keys:
            h = h ^ (k.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km; coordinates in radians."""
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2)**2
    return 2 * 6371.0 * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def diurnal(local_hour) -> np.ndarray:
    """Load in [0, 1] at a local hour (float): peaks ~21:00, trough 04:00-05:00."""
    return np.interp(np.mod(local_hour, 24.0), np.arange(25.0), np.append(_DIURNAL, _DIURNAL[0]))


@lru_cache(maxsize=1)
def load_cities() -> dict:
    """The shipped city table as arrays (lat/lon in degrees, hub as a row index or -1)."""
    text = resources.files("ping_llm.data").joinpath("cities.csv").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    rows = [ln.split(",") for ln in lines[1:]]
    names = [r[0] for r in rows]
    col = {k: i for i, k in enumerate(lines[0].split(","))}
    f = lambda k: np.array([float(r[col[k]]) for r in rows])  # noqa: E731
    return dict(name=names, country=[r[1] for r in rows],
                rir=np.array([RIRS.index(r[2]) for r in rows]), lat=f("lat"), lon=f("lon"),
                utc=f("utc_offset"), weight=f("weight"), detour=f("detour"),
                hub=np.array([names.index(r[col["hub"]]) if r[col["hub"]] else -1 for r in rows]))


@lru_cache(maxsize=1)
def _code_cells() -> tuple[np.ndarray, np.ndarray]:
    from ping_llm import tokens

    cells = tokens.rtt_code_cells_ms()
    valid = np.flatnonzero(~np.isnan(cells[:, 0]))  # increasing codes = increasing RTT
    return valid, np.append(cells[valid, 0], np.inf)


# ----------------------------------------------------------------------------------------------
# ground truth


@dataclass
class Truth:
    """True outcome law of N (src, dst, time) queries: P(failed) and the RTT law given a reply.

    RTT = loc + scale * X, X ~ (1 - w) LogNormal(0, sigma) + w Pareto(xm, alpha) truncated at
    X <= tmax_ms / scale. All arrays (N,).
    """

    p_fail: np.ndarray
    loc: np.ndarray  # ms: the floor (propagation + access + congestion shift)
    scale: np.ndarray  # ms: median of the jitter body
    w: np.ndarray  # weight of the heavy tail
    sigma: float
    alpha: float
    xm: float
    tmax_ms: float

    def _ymax(self) -> np.ndarray:  # truncation point of the tail in units of scale (> xm)
        return np.maximum(self.tmax_ms / self.scale, 2 * self.xm)

    def __len__(self) -> int:
        return len(self.p_fail)

    def __getitem__(self, rows) -> Truth:
        """The truth of a subset of the queries (index, slice or mask), e.g. to chunk pdf_codes."""
        rows = np.atleast_1d(np.arange(len(self))[rows])
        return Truth(self.p_fail[rows], self.loc[rows], self.scale[rows], self.w[rows],
                     self.sigma, self.alpha, self.xm, self.tmax_ms)

    def cdf(self, rtt_ms) -> np.ndarray:
        """P(RTT <= x | reply): x (K,) shared or (N, K) per row -> (N, K)."""
        x = np.asarray(rtt_ms, dtype=np.float64)
        x = x[None, :] if x.ndim == 1 else x
        y = (x - self.loc[:, None]) / self.scale[:, None]  # jitter in units of scale
        z = (self.xm / self._ymax()[:, None]) ** self.alpha  # P(untruncated Pareto > ymax)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            y_pos = np.maximum(y, 1e-300)
            body = ndtr(np.log(y_pos) / self.sigma)
            tail = np.clip((1.0 - (self.xm / y_pos) ** self.alpha) / (1 - z), 0.0, 1.0)
        w = self.w[:, None]
        return np.where(y > 0, (1 - w) * body + w * tail, 0.0)

    def pdf_codes(self) -> np.ndarray:
        """(N, 65536) probability of each 16-bit RTT code given a reply (0 for unused codes).

        Memory is ~1.5 MB per row: chunk large N with `truth[i:j].pdf_codes()`."""
        valid, edges = _code_cells()
        mass = np.diff(self.cdf(edges), axis=1)
        mass[:, -1] += 1.0 - mass.sum(axis=1)  # the clamp code absorbs the (tiny) rest
        out = np.zeros((len(self), 65536))
        out[:, valid] = mass
        return out

    def pdf_byte1(self) -> np.ndarray:
        """(N, 256) probability of each RTT byte1 (log-scale bin, 8 per octave) given a reply."""
        return self.pdf_codes().reshape(len(self), 256, 256).sum(axis=2)

    def quantiles(self, qs) -> np.ndarray:
        """(N, Q) RTT quantiles in ms given a reply (bisection on the exact CDF)."""
        q = np.asarray(qs, dtype=np.float64)
        if np.any((q <= 0) | (q >= 1)):
            raise InputError("quantiles must be in (0, 1)")
        lo = np.full((len(self), len(q)), -40.0)  # log of jitter in scale units
        hi = np.full_like(lo, 40.0)
        for _ in range(64):
            mid = (lo + hi) / 2
            below = self.cdf(self.loc[:, None] + self.scale[:, None] * np.exp(mid)) < q
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        return self.loc[:, None] + self.scale[:, None] * np.exp((lo + hi) / 2)

    def median(self) -> np.ndarray:
        return self.quantiles([0.5])[:, 0]

    def mean(self) -> np.ndarray:
        a, r = self.alpha, self.xm / self._ymax()
        tail = a * self.xm / (a - 1) * (1 - r ** (a - 1)) / (1 - r**a)
        return self.loc + self.scale * ((1 - self.w) * math.exp(self.sigma**2 / 2) + self.w * tail)

    def sample(self, rng: np.random.Generator, rows=None) -> np.ndarray:
        """One RTT (ms) per entry of `rows` (indices into the N queries; default: each once)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        n = len(rows)
        return self.draw(rows, rng.standard_normal(n), rng.random(n), rng.random(n))

    def draw(self, rows, z, u, v) -> np.ndarray:
        """`sample` from given draws: z standard normal, u and v uniform on [0, 1), per row."""
        z_tail = (self.xm / self._ymax()[rows]) ** self.alpha
        x = np.where(u < self.w[rows], self.xm * (1.0 - v * (1 - z_tail)) ** (-1.0 / self.alpha),
                     np.exp(self.sigma * z))
        return self.loc[rows] + self.scale[rows] * x

    def kl(self, p_fail_model, pdf_codes_model, eps: float = 1e-12) -> np.ndarray:
        """(N,) KL(truth || model) in nats over {failed} + the 65536 RTT codes."""
        pf, q = np.asarray(p_fail_model)[:, None], np.asarray(pdf_codes_model)
        p = self.pdf_codes() * (1 - self.p_fail[:, None])
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(p / np.maximum(q * (1 - pf), eps)), 0.0)
            f = np.where(self.p_fail > 0, self.p_fail * np.log(
                self.p_fail / np.maximum(pf[:, 0], eps)), 0.0)
        return terms.sum(axis=1) + f


# ----------------------------------------------------------------------------------------------
# the world


# What `synth_atlas.generate` writes beside its results (the world, its geolocation database):
# not results, so a directory of synthetic output ingests cleanly (`ingest` skips them).
COMPANION_SUFFIXES = (".world.json", ".geo.mmdb")


def world_path(out) -> Path:
    """Where `synth_atlas.generate` records the world next to its output."""
    return Path(str(out) + ".world.json")


def geo_db_path(out) -> Path:
    """Where `synth_atlas.generate` writes the world's geolocation database next to its output
    (`out` the results file, or its world.json)."""
    out = str(out)
    return Path(out.removesuffix(".world.json") + ".geo.mmdb")


class World:
    """Cities, networks, endpoints (probes, servers, anycast services) and their ground truth."""

    def __init__(self, config: SynthConfig | None = None):
        self.config = c = config or SynthConfig()
        self.cities = C = load_cities()
        rng = np.random.default_rng([c.seed, 0x5EED])
        self.lat, self.lon = np.radians(C["lat"]), np.radians(C["lon"])
        self._build_ases(rng)
        self._build_endpoints(rng)
        self._build_addresses(rng)
        self._build_outages(rng)

    @classmethod
    def build(cls, config: SynthConfig | None = None) -> World:
        """The world of `config` (default: the embedded default world); same config, same world."""
        return cls(config)

    # -- construction ------------------------------------------------------------------------
    def _build_ases(self, rng):
        C, ncity = self.cities, len(self.cities["name"])
        country = np.array(C["country"])
        ases = []  # (kind 0 access / 1 hosting / 2 anycast operator, rir, [cities])
        for cc in sorted(set(C["country"])):
            cs = np.flatnonzero(country == cc)
            cs = cs[np.argsort(-C["weight"][cs], kind="stable")]
            n = int(np.clip(round(C["weight"][cs].sum() / 4), 1, 4))
            for _ in range(n):  # national ISPs: the biggest city plus some others
                keep = cs[1:][rng.random(len(cs) - 1) < 0.6][:14]
                ases.append((0, C["rir"][cs[0]], [int(cs[0]), *map(int, keep)]))
            covered = {x for a in ases[-n:] for x in a[2]}
            for x in cs:
                if x not in covered and len(ases[-1][2]) < 15:
                    ases[-1][2].append(int(x))
        p_hub = C["weight"] ** 2 / (C["weight"] ** 2).sum()
        for _ in range(10):  # hosting / cloud networks in the big hubs
            k = int(rng.integers(1, 13))
            cs = rng.choice(ncity, size=k, replace=False, p=p_hub)
            ases.append((1, C["rir"][cs[0]], [int(x) for x in cs]))
        c_any = self.config.anycast_services
        for _ in range(c_any):  # anycast operators: their sites are drawn below
            ases.append((2, int(rng.integers(0, 5)), []))
        self.as_kind = np.array([a[0] for a in ases])
        self.as_rir = np.array([a[1] for a in ases])
        self.as_cities = [a[2] for a in ases]
        # Prefixes: a distinct IPv4 /16 and IPv6 /32 per AS from its registry's space.
        v4, v6 = set(), set()
        self.as_v4 = np.zeros(len(ases), np.int64)
        self.as_v6 = np.zeros(len(ases), np.int64)
        for i, r in enumerate(self.as_rir):
            while (p := int(rng.choice(_V4_OCTETS[r])) << 24 | int(rng.integers(256)) << 16) in v4:
                pass
            while (q := (_V6_TOP[r] + int(rng.integers(0, 16 if r < 4 else 1))) << 16
                   | int(rng.integers(0x1000 if r < 4 else 0xF000, 0x10000))) in v6:
                pass
            v4.add(p)
            v6.add(q)
            self.as_v4[i], self.as_v6[i] = p, q
        self.anycast_as = np.flatnonzero(self.as_kind == 2)
        sites = []
        for _ in range(c_any):
            k = min(int(np.exp(rng.uniform(np.log(4), np.log(40)))), ncity)
            pw = C["weight"] ** 0.7
            sites.append(rng.choice(ncity, size=k, replace=False, p=pw / pw.sum()))
        self.sites = np.full((c_any, max(len(s) for s in sites)), -1)
        for i, s in enumerate(sites):
            self.sites[i, : len(s)] = s

    def _build_endpoints(self, rng):
        c, C = self.config, self.cities
        n_anchor = max(1, round(c.anchor_frac * c.probes))  # at least one anchor
        n_home, n_any = c.probes - n_anchor, c.anycast_services
        n_server = max(1, round(c.servers_per_probe * c.probes))
        kind = np.repeat([HOME, ANCHOR, SERVER, ANYCAST], [n_home, n_anchor, n_server, n_any])
        n = len(kind)
        pw = C["weight"] / C["weight"].sum()
        access = np.flatnonzero(self.as_kind == 0)
        hosting = np.flatnonzero(self.as_kind == 1)
        by_city = {}
        for a in access:
            for x in self.as_cities[a]:
                by_city.setdefault(x, []).append(a)
        city, asn = np.full(n, -1), np.zeros(n, np.int64)
        in_dc = (kind == ANCHOR) | ((kind == SERVER) & (rng.random(n) < 0.6))
        for e in range(n):
            if kind[e] == ANYCAST:
                asn[e] = self.anycast_as[e - (n - n_any)]
            elif in_dc[e]:
                asn[e] = rng.choice(hosting)
                cs = np.array(self.as_cities[asn[e]])
                city[e] = rng.choice(cs, p=C["weight"][cs] / C["weight"][cs].sum())
            else:
                city[e] = rng.choice(len(pw), p=pw)
                asn[e] = rng.choice(by_city[city[e]])
        tech = rng.choice(4, size=n, p=_TECH[:, 0])
        ln = lambda med, s: med * np.exp(s * rng.standard_normal(n))  # noqa: E731
        home = kind == HOME
        dc = {ANCHOR: (.15, .05, .1, .001, .005), SERVER: (.3, .1, .3, .003, .01),
              ANYCAST: (.2, .05, .1, .002, .005)}
        prm = np.array([_TECH[tech[e], 1:] if home[e] else dc[kind[e]] for e in range(n)])
        self.kind, self.city, self.asn = kind, city, asn
        self.first_anycast = n - n_any
        self.access = ln(prm[:, 0], 0.4)  # ms of RTT added by the last mile / host
        self.jit = ln(prm[:, 1], 0.3)  # ms, median jitter contributed
        self.cong = ln(prm[:, 2], 0.7)  # ms of queueing at the evening peak
        self.loss = np.minimum(ln(prm[:, 3], 0.5), 0.2)
        self.tail_w = np.minimum(ln(prm[:, 4], 0.3), 0.2)
        filt = np.zeros(n)
        srv = np.flatnonzero(kind == SERVER)
        u = rng.random(len(srv))
        filt[srv] = np.where(u < c.filtered_frac, 1.0,
                             np.where(u < 3 * c.filtered_frac, rng.uniform(.05, .4, len(srv)), 0))
        self.filt = filt  # P(ICMP to this destination is dropped)
        p6 = np.select([home, kind == ANCHOR, kind == SERVER], [c.dual_stack_frac, .9, .5], 1.0)
        self.v6 = rng.random(n) < p6
        self.v6_loss = np.where(home & (rng.random(n) < 0.1), rng.uniform(.2, .5, n), 0.0)
        self.ttl0 = np.where(kind == ANYCAST, 255, rng.choice([64, 64, 64, 128, 255], size=n))
        self.prb_id = np.zeros(n, np.int64)
        probe = kind <= ANCHOR
        self.prb_id[probe] = rng.choice(np.arange(10, 70_000), size=int(probe.sum()), replace=False)
        self.fw = rng.choice(len(FIRMWARE), size=n, p=[.1, .3, .6])
        self.fw[kind == ANCHOR] = len(FIRMWARE) - 1

    def _build_addresses(self, rng):
        """IPv4 /20 and IPv6 /40 per (AS, city); home /24s 0-14, infrastructure in the 16th."""
        c, n = self.config, len(self.kind)
        span = c.days * 86400.0
        period = np.where(rng.random(n) < c.renumber_frac,
                          np.exp(rng.uniform(np.log(1), np.log(14), n)) * 86400, 1e15)
        period[self.kind != HOME] = 1e15
        self.phase = rng.random(n) * np.minimum(period, span)
        count = (span + self.phase) // period + 1
        blk = np.array([self.as_cities[a].index(x) if x >= 0 else 0
                        for a, x in zip(self.asn, self.city, strict=True)])
        self.lan4 = [f"192.168.{rng.choice([0, 1, 1, 2, 178])}.{rng.integers(2, 255)}"
                     if k == HOME else "" for k in self.kind]
        iid = rng.integers(0, 2**63, size=n)  # IPv6 interface identifiers of home probes
        self.slot0 = np.zeros(n, np.int64)
        s4, s6, groups = [], [], {}
        for e in range(n):
            groups.setdefault((self.asn[e], blk[e], self.kind[e] == HOME), []).append(e)
        # Per pool an affine bijection idx -> (a * idx + b) mod P scatters probes over the pool.
        coprime = [m for m in range(101, 3000, 2) if math.gcd(m, 3810) == 1]
        mult = {g: (int(rng.choice(coprime)), int(rng.integers(0, 2**16))) for g in groups}
        for e in range(n):
            a, b, k = int(self.asn[e]), int(blk[e]), int(self.kind[e])
            g = groups[(a, b, k == HOME)]
            j, ng = g.index(e), len(g)
            base4, base6 = int(self.as_v4[a]) + (b << 12), (int(self.as_v6[a]) << 96) + (b << 88)
            self.slot0[e] = len(s4)
            if k == ANYCAST:
                s4.append(int(self.as_v4[a]) | 0x3500 | 53)
                s6.append((int(self.as_v6[a]) << 96) | 0x53)
            elif k != HOME:  # infrastructure: x.y.(16b+15).j+1, 2aXX:XXXX:XXff::j+1
                s4.append(base4 + (15 - j // 254) * 256 + 1 + j % 254)
                s6.append(base6 + (0xFF << 80) + j + 1)
            else:  # home: a fresh pool slot per renumbering epoch, never reused by another probe
                count[e] = min(count[e], 3810 // ng)
                for ep in range(int(count[e])):
                    m, off = mult[(a, b, True)]
                    i4 = (m * (j + ng * ep) + off) % 3810  # 15 /24s x 254 hosts
                    s4.append(base4 + (i4 // 254) * 256 + 1 + i4 % 254)
                    i6 = (m * (j + ng * ep) + off) % 65536
                    s6.append(base6 + (i6 << 64) + (int(iid[e]) | (1 << 57)))
        self.slot_count = count.astype(np.int64)
        self.period = period
        self.addr4 = [str(ipaddress.IPv4Address(x)) for x in s4]
        self.addr6 = [str(ipaddress.IPv6Address(x)) for x in s6]
        self.slot_owner = np.repeat(np.arange(n), self.slot_count)
        index = {}  # address -> endpoint * 2 + is_ipv6
        for s, e in enumerate(self.slot_owner.tolist()):
            index[self.addr4[s]] = 2 * e
            if self.v6[e]:
                index[self.addr6[s]] = 2 * e + 1
        if len(index) != len(s4) + int(self.v6[self.slot_owner].sum()):
            raise RuntimeError("synth: address collision (bug)")
        self.index = index

    def _build_outages(self, rng):
        c = self.config
        start, span = c.start, c.days * 86400.0
        wins = []
        for e in np.flatnonzero(self.kind <= ANCHOR):
            rate = c.outages_per_day * (1.0 if self.kind[e] == HOME else 0.2) * c.days
            for _ in range(rng.poisson(rate)):
                t0 = start + rng.uniform(-3600, span)
                wins.append((e, t0, t0 + np.clip(np.exp(rng.normal(np.log(3600), 1)), 300, 86400)))
        wins.sort()
        merged = []  # per endpoint, non-overlapping and sorted: what `_in_outage` relies on
        for e, a, b in wins:
            if merged and merged[-1][0] == e and a <= merged[-1][2]:
                merged[-1][2] = max(merged[-1][2], b)
            else:
                merged.append([e, a, b])
        w = np.array(merged, dtype=np.float64).reshape(-1, 3)
        self.out_e, self.out_start, self.out_end = w[:, 0].astype(np.int64), w[:, 1], w[:, 2]
        self._out_key = self.out_e * 2.0**33 + self.out_start

    # -- queries -----------------------------------------------------------------------------
    def _in_outage(self, e, t) -> np.ndarray:
        if len(self.out_e) == 0:
            return np.zeros(np.shape(t), bool)
        i = np.searchsorted(self._out_key, e * 2.0**33 + t, side="right") - 1  # last start <= t
        return (i >= 0) & (self.out_e[np.maximum(i, 0)] == e) & (t < self.out_end[np.maximum(i, 0)])

    def slot(self, e, t) -> np.ndarray:
        """Address slot (index into addr4/addr6) of endpoint(s) e at epoch second(s) t."""
        k = np.floor((t - self.config.start + self.phase[e]) / self.period[e])
        return self.slot0[e] + np.clip(k, 0, self.slot_count[e] - 1).astype(np.int64)

    def _pair(self, s, d, af):
        """Time-independent parameters of unique (src, dst, af) rows."""
        seed, as_s = self.config.seed, self.asn[s]
        cs = self.city[s]
        cd = self.city[d].copy()
        anyc = self.kind[d] == ANYCAST
        if anyc.any():  # BGP: nearest site 75%, else the 2nd or 3rd nearest (per network, af)
            sid = d[anyc] - self.first_anycast
            st = self.sites[sid]  # (M, max_sites) city indices, -1 = padding
            km = np.where(st >= 0, _km(self.lat[cs[anyc], None], self.lon[cs[anyc], None],
                                       self.lat[st], self.lon[st]), np.inf)
            u = _u01(seed, 1, as_s[anyc], sid, af[anyc])
            rank = np.minimum((u > .75).astype(int) + (u > .92), (st >= 0).sum(1) - 1)
            rows = np.arange(len(sid))
            cd[anyc] = st[rows, np.argsort(km, axis=1, kind="stable")[rows, rank]]
        as_d = self.asn[d]
        a_lo, a_hi = np.minimum(as_s, as_d), np.maximum(as_s, as_d)  # path properties symmetric
        C = self.cities
        km = _km(self.lat[cs], self.lon[cs], self.lat[cd], self.lon[cd])
        side = C["detour"][cs] >= C["detour"][cd]
        hub, p = np.where(side, C["hub"][cs], C["hub"][cd]), np.maximum(C["detour"][cs],
                                                                        C["detour"][cd])
        trombone = (hub >= 0) & (as_s != as_d) & (_u01(seed, 2, a_lo, a_hi) < p)
        h = np.maximum(hub, 0)
        via = _km(self.lat[cs], self.lon[cs], self.lat[h], self.lon[h]) + _km(
            self.lat[h], self.lon[h], self.lat[cd], self.lon[cd])
        metro = np.where(as_s != as_d, 10 + 90 * _u01(seed, 3, a_lo, a_hi),  # via an exchange
                         5 + 20 * _u01(seed, 3, a_lo, a_hi))
        km = np.where(trombone, via, km) + metro
        infl = np.minimum(1.15 - 0.35 * np.log1p(-_u01(seed, 4, a_lo, a_hi)), 3.0)
        infl *= 0.95 + 0.1 * _u01(seed, 5, s, d)
        v6bad = (af == 6) & (_u01(seed, 6, a_lo, a_hi) < 0.3)
        infl *= np.where(v6bad, 1.1 + 0.5 * _u01(seed, 7, a_lo, a_hi), 1.0)
        prop = 2 * km * infl / KM_PER_MS
        return dict(
            base=prop + self.access[s] + self.access[d],
            jit=self.jit[s] + self.jit[d] + 0.01 * prop, utc_s=C["utc"][cs], utc_d=C["utc"][cd],
            loss=self.loss[s] + self.loss[d] + np.where(af == 6, self.v6_loss[s], 0.0),
            hops=(4 + km / 1200 + 6 * _u01(seed, 8, s, d)).astype(np.int64), km=km)

    def truth_idx(self, s, d, af, t) -> tuple[Truth, dict]:
        """Truth (and pair details) for endpoint indices s, d, af 4|6, epoch seconds t (N,)."""
        s, d, af, t = np.broadcast_arrays(*(np.asarray(x) for x in (s, d, af, t)))
        s, d, af, t = s.astype(np.int64), d.astype(np.int64), af.astype(np.int64), t.astype(float)
        key = (s * len(self.kind) + d) * 2 + (af == 6)
        uk, inv = np.unique(key, return_inverse=True)
        pr = {k: v[inv] for k, v in self._pair(uk // 2 // len(self.kind), uk // 2 % len(self.kind),
                                               np.where(uk % 2, 6, 4)).items()}
        c = self.config
        f_s = diurnal(t / 3600 + pr["utc_s"])
        f_d = diurnal(t / 3600 + pr["utc_d"])
        epoch = np.floor(t / 21600).astype(np.int64)  # route changes: level shifts per 6 hours
        shift = np.where(_u01(c.seed, 9, s, d, epoch, af) < c.route_change_prob,
                         5 + 40 * _u01(c.seed, 10, s, d, epoch, af), 0.0)
        loc = pr["base"] + self.cong[s] * f_s + self.cong[d] * f_d + shift
        p_loss = np.minimum(pr["loss"] * (1 + 2 * f_s), 0.6)
        p_fail = 1 - (1 - self.filt[d]) * (1 - self._in_outage(s, t)) * (1 - p_loss)
        tr = Truth(p_fail=p_fail, loc=loc, scale=pr["jit"] * (1 + 1.5 * f_s),
                   w=np.minimum(self.tail_w[s] * (1 + 2 * f_s), 0.5), sigma=c.jitter_sigma,
                   alpha=c.tail_alpha, xm=c.tail_xm, tmax_ms=c.tail_max_ms)
        return tr, pr

    def resolve(self, addrs) -> tuple[np.ndarray, np.ndarray]:
        """Public address strings -> (endpoint index, af) arrays; InputError if not in the world."""
        items = np.atleast_1d(np.asarray(addrs, dtype=object)).ravel().tolist()
        get = self.index.get
        code = np.fromiter((get(a, -1) for a in items), np.int64, len(items))
        for i in np.flatnonzero(code < 0).tolist():  # not in canonical form, or unknown
            try:
                code[i] = get(str(ipaddress.ip_address(str(items[i]).strip())), -1)
            except ValueError:
                raise InputError(f"not an IP address: {items[i]!r}") from None
            if code[i] < 0:
                raise InputError(f"{items[i]} is not an address of this synthetic world "
                                 "(sources are public `from` addresses)")
        return code >> 1, np.where(code & 1, 6, 4)

    def truth(self, src, dst, time) -> Truth:
        """Ground truth for (src, dst, time): addresses (str or sequences), epoch seconds."""
        s, af_s = self.resolve(src)
        d, af_d = self.resolve(dst)
        try:
            s, d, af_s, af_d, t = np.broadcast_arrays(s, d, af_s, af_d, np.asarray(time, float))
        except ValueError:
            raise InputError("src, dst and time must have one length (or be scalars)") from None
        if np.any(af_s != af_d):
            raise InputError("src and dst must be of the same address family")
        if np.any(self.kind[s] == ANYCAST):
            raise InputError("an anycast service address cannot be a source")
        if not np.all(np.isfinite(t)):
            raise InputError("time must be finite epoch seconds")
        return self.truth_idx(s, d, af_s, t)[0]

    # -- bookkeeping ------------------------------------------------------------------------
    def fingerprint(self) -> str:
        h = hashlib.sha256("\n".join(self.addr4 + self.addr6).encode())
        h.update(np.round(np.concatenate([self.access, self.jit, self.cong]), 9).tobytes())
        return h.hexdigest()[:16]

    def endpoint_table(self) -> dict:
        """Every endpoint: kind, prb_id, city/country/lat/lon (anycast: none), AS, first addrs."""
        C, has = self.cities, self.city >= 0
        s0 = self.slot0
        return dict(kind=[KIND_NAMES[k] for k in self.kind], prb_id=self.prb_id.tolist(),
                    city=[C["name"][x] if x >= 0 else "" for x in self.city],
                    country=[C["country"][x] if x >= 0 else "" for x in self.city],
                    lat=np.where(has, C["lat"][self.city], np.nan),
                    lon=np.where(has, C["lon"][self.city], np.nan), asn=self.asn.copy(),
                    addr4=[self.addr4[i] for i in s0],
                    addr6=[self.addr6[i] if v else "" for i, v in zip(s0, self.v6, strict=True)])

    def save(self, path, summary: dict | None = None) -> None:
        doc = dict(format="ping-llm-synth-world", version=1, config=asdict(self.config),
                   fingerprint=self.fingerprint(), summary=summary or {})
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")

    @classmethod
    def load(cls, path) -> World:
        """Rebuild the world recorded by `save` (or next to a `synth_atlas.generate` output)."""
        p = Path(path)
        p = p if p.name.endswith(".world.json") else world_path(p)
        try:
            doc = json.loads(p.read_text())
            cfg = SynthConfig(**{f.name: doc["config"][f.name] for f in fields(SynthConfig)
                                 if f.name in doc["config"]})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"cannot read synthetic world {p}: {e}") from None
        world = cls(cfg)
        if doc.get("fingerprint") != world.fingerprint():
            raise InputError(f"{p} was written by a different generator version: "
                             "its world cannot be rebuilt exactly")
        return world
