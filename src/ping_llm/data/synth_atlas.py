"""The synthetic Internet's measurements, written as RIPE Atlas ping results (`ping-llm synth`).

`generate` schedules measurements in a `synth.World` the way Atlas runs them -- built-in pings to
anycast services every 240 s from every probe (like msm 1001/2001), the anchoring mesh, and
user-defined one-off and periodic measurements with a per-probe phase ("spread") -- draws every
packet from the world's ground truth (`World.truth_idx`), and writes one RIPE Atlas ping result
per line (.jsonl, or .jsonl.gz), with the config recorded next to it (`synth.world_path`) so that
`synth.World.load` rebuilds the exact truth. Same config, byte-identical files.

It streams: results are generated and written a time window at a time (`WINDOW_RESULTS`), so
memory is flat in the number of packets (~0.4 GB per window, plus the schedule: one row per
(measurement, probe)). Every random draw is taken from the position it would have in one pass
(PCG64 jumps there), so the output does not depend on the window size.

It also publishes what a real Internet publishes about its addresses: a MaxMind-format
geolocation database of the world (`geo_db_path`, written by `write_geo_db`), the synthetic
counterpart of GeoLite2 for the geolocation baseline and for a model's address knowledge. Like a
real one it is right at the country level and approximate below it: each network (an AS's /20
and /40 in one city) is placed near its city (within ~25 km), except that 15% of them are placed
at their AS's first city (the registration address a real database often reports); anycast
services are not in it. Continents follow the registry (RIPE -> EU, ARIN -> NA, APNIC -> AS,
LACNIC -> SA, AFRINIC -> AF); ASNs are 64512 + the network's index (the private range).

Why a module apart from `synth`: the world and its truth are what evaluation needs; the schedule
and the Atlas JSON format are what ingest needs. This module sits on top of `synth` (it imports
the world, never the other way round).
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from ping_llm.data.synth import (
    ANCHOR,
    ANYCAST,
    FIRMWARE,
    HOME,
    RIRS,
    SERVER,
    SynthConfig,
    World,
    geo_db_path,
    world_path,
)
from ping_llm.errors import InputError

GEO_MISPLACED = 0.15  # networks a database places at their AS's first city
GEO_JITTER_KM = 25.0  # typical distance of the others from their true city
# Results generated (and held in memory) at a time: ~0.4 GB at ~3 packets a result. The output is
# the same for any value (tests/data/test_synth.py), only the peak memory changes.
WINDOW_RESULTS = 1_000_000
_RIR_CONTINENT = {"RIPE": "EU", "ARIN": "NA", "APNIC": "AS", "LACNIC": "SA", "AFRINIC": "AF"}


def write_geo_db(w: World, path) -> Path:
    """The world's MaxMind-format database (IPv6 tree with IPv4 inside, like GeoLite2-City)."""
    import ipaddress

    from mmdb_writer import MmdbF64, MmdbU16, MmdbU32, MMDBWriter, TreeWriter
    from netaddr import IPSet

    rng = np.random.default_rng([w.config.seed, 0x6E0])
    C = w.cities
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True,
                        database_type="ping-llm-synthetic-world-City",
                        description=f"ping-llm synthetic world, seed {w.config.seed}")
    for a, cities in enumerate(w.as_cities):
        for b, x in enumerate(cities):
            misplaced = rng.random() < GEO_MISPLACED
            at = cities[0] if misplaced else x
            d = rng.exponential(GEO_JITTER_KM) / 6371.0088  # radians of arc
            bearing = rng.uniform(0, 2 * np.pi)
            lat = float(np.clip(C["lat"][at] + np.degrees(d * np.cos(bearing)), -89.9, 89.9))
            lon = float((C["lon"][at] + np.degrees(d * np.sin(bearing)) + 180) % 360 - 180)
            record = {
                "location": {"latitude": MmdbF64(round(lat, 4)),
                             "longitude": MmdbF64(round(lon, 4)),
                             "accuracy_radius": MmdbU16(500 if misplaced else 50)},
                "country": {"iso_code": C["country"][at]},
                "continent": {"code": _RIR_CONTINENT[RIRS[int(C["rir"][at])]]},
                "autonomous_system_number": MmdbU32(64512 + a),
            }
            v4 = ipaddress.IPv4Network((int(w.as_v4[a]) + (b << 12), 20))
            v6 = ipaddress.IPv6Network(((int(w.as_v6[a]) << 96) + (b << 88), 40))
            writer.insert_network(IPSet([str(v4), str(v6)]), record)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # The writer's own metadata stamps the wall clock; the world's start time instead keeps the
    # file (and so its sha256, which runs record) the same for the same config.
    meta = {"ip_version": 6, "database_type": writer.database_type, "languages": [],
            "binary_format_major_version": 2, "binary_format_minor_version": 0,
            "build_epoch": int(w.config.start), "description": writer.description}
    TreeWriter(writer.tree, meta, writer.int_type, writer.float_type).write(str(tmp))
    os.replace(tmp, path)
    return path


def _schedule(w: World, rng) -> tuple[list, _Streams]:
    """Measurements (built-in, anchoring mesh, user-defined) and their result streams."""
    c = w.config
    t0, span = c.start, c.days * 86400.0
    t1 = t0 + span
    probes = np.flatnonzero(w.kind <= ANCHOR)
    home, anchors = probes[w.kind[probes] == HOME], probes[w.kind[probes] == ANCHOR]
    servers, anyc = np.flatnonzero(w.kind == SERVER), np.flatnonzero(w.kind == ANYCAST)
    region = np.where(w.city >= 0, w.cities["rir"][np.maximum(w.city, 0)], -1)
    v6 = lambda ps: ps[w.v6[ps]]  # noqa: E731
    msms = []  # (msm_id, dst, af, probes, step or 0 for one-off, start, stop, packets, size, group)
    for i in range(c.builtin_services):  # built-in: every probe, every 240 s (like msm 1001/2001)
        msms += [(1001 + i, anyc[i], 4, probes, 240, t0, t1, 3, 48, False),
                 (2001 + i, anyc[i], 6, v6(probes), 240, t0, t1, 3, 48, False)]
    for j, a in enumerate(anchors):  # anchoring mesh: up to 20 other anchors, 8 home probes
        others = anchors[anchors != a]
        ps = np.concatenate([rng.choice(others, size=min(20, len(others)), replace=False),
                             rng.choice(home, size=min(8, len(home)), replace=False)])
        msms.append((1_400_000 + 2 * j, a, 4, ps, c.mesh_step, t0, t1, 3, 48, True))
        if w.v6[a]:
            msms.append((1_400_001 + 2 * j, a, 6, v6(ps), c.mesh_step, t0, t1, 3, 48, True))
    n_user = round(c.user_msms_per_probe * c.probes)
    ids = np.sort(rng.choice(np.arange(20_000_000, 70_000_000), size=n_user, replace=False))
    steps = [300, 900, 1800, 3600, 10800, 21600, 86400]
    cover = rng.permutation(servers)  # every server is the target of at least one measurement
    for i, mid in enumerate(ids.tolist()):
        r = rng.random()
        dst = cover[i] if i < len(cover) else rng.choice(
            servers if r < .8 else anchors if r < .9 else anyc)
        af = 6 if w.v6[dst] and rng.random() < .25 else 4
        pool = probes[probes != dst] if af == 4 else v6(probes[probes != dst])
        r = rng.random()  # probes from the destination's region, from one region, or anywhere
        want = region[dst] if r < .3 else rng.integers(0, 5) if r < .6 else -1
        sub = pool[region[pool] == want] if want >= 0 else pool
        sub = sub if len(sub) >= 2 else pool
        if len(sub) == 0:
            continue
        ps = rng.choice(sub, size=min(len(sub), int(np.exp(rng.uniform(0, np.log(25))))),
                        replace=False)
        step = 0 if rng.random() < .15 else int(rng.choice(steps, p=[.1, .15, .2, .2, .2, .1, .05]))
        start = t0 if rng.random() < .5 else t0 + rng.uniform(0, .8 * span)
        stop = t1 if rng.random() < .5 else min(t1, start + rng.uniform(.1, 1) * span)
        msms.append((mid, dst, af, ps, step, start, stop, int(rng.choice([3, 1, 5, 10], p=[
            .8, .08, .07, .05])), int(rng.choice([48, 64, 1000], p=[.5, .4, .1])), True))
    # One stream per (measurement, probe). The RNG stream from here on holds, per measurement,
    # its probes' phases and then one jitter draw per result; both are uniform doubles (one
    # 64-bit draw each), so a result's jitter sits at a known stream position and any time
    # window's results can be drawn on their own with the values they have all at once.
    origin, pos = rng.bit_generator.state, 0
    cols = {k: [] for k in ("m", "e", "base", "step", "n", "off")}
    for m, (_, _, _, ps, step, start, stop, *_) in enumerate(msms):
        if len(ps) == 0:
            continue
        g = _at(origin, pos)
        if step == 0:  # one-off: one result per probe, within ten minutes of the start
            nk, phase, step = np.ones(len(ps), np.int64), g.uniform(0, 600, len(ps)), 1
        else:  # periodic: each probe at its own phase in the interval (Atlas "spread")
            phase = g.uniform(0, step, len(ps))
            nk = np.maximum(np.ceil((stop - start - phase) / step), 0).astype(np.int64)
        pos += len(ps)
        cols["m"].append(np.full(len(ps), m))
        cols["e"].append(ps)
        cols["base"].append(start + phase)
        cols["step"].append(np.full(len(ps), step))
        cols["n"].append(nk)
        cols["off"].append(pos + np.cumsum(nk) - nk)
        pos += int(nk.sum())
    arrays = {k: np.concatenate(v) for k, v in cols.items()}
    return msms, _Streams(origin=origin, end=pos, t1=t1, **arrays)


@dataclass
class _Streams:
    """The results of every (measurement, probe), and where their random draws are.

    Result k of stream i is at `floor(base[i] + k * step[i] + jitter)` (kept when before t1), its
    jitter the uniform(0, 3) at position off[i] + k of the RNG stream that starts at `origin`;
    `end` is the position after the last draw, where the packets' draws begin."""

    origin: dict
    end: int
    t1: float
    m: np.ndarray
    e: np.ndarray
    base: np.ndarray
    step: np.ndarray
    n: np.ndarray
    off: np.ndarray

    def results(self, a: float, b: float) -> dict:
        """(m, e, t) of the results with a <= t < b, ordered by (measurement, probe, k)."""
        lo = np.clip(np.floor((a - 4 - self.base) / self.step), 0, self.n).astype(np.int64)
        hi = np.clip(np.ceil((b - self.base) / self.step) + 1, 0, self.n).astype(np.int64)
        live = np.flatnonzero(hi > lo)  # a superset of the window's; the exact test is below
        cnt = hi[live] - lo[live]
        idx = np.repeat(live, cnt)
        k = lo[idx] + np.arange(len(idx)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        bg = np.random.PCG64()  # one, re-positioned per stream (`_at` makes a new one: slower)
        jitter = np.empty(len(idx))
        at = 0
        for i, c in zip(live.tolist(), cnt.tolist(), strict=True):
            bg.state = self.origin
            bg.advance(int(self.off[i] + lo[i]))
            jitter[at: at + c] = np.random.Generator(bg).uniform(0, 3, c)
            at += c
        t = np.floor(self.base[idx] + k * self.step[idx] + jitter)
        keep = (t >= a) & (t < b) & (t < self.t1)
        return {"m": self.m[idx][keep], "e": self.e[idx][keep], "t": t[keep].astype(np.int64)}

    def windows(self, max_results: int) -> list[tuple[float, float]]:
        """Time windows [a, b), in order, of about max_results results each; together they
        cover every time (the first starts at -inf, the last ends at +inf)."""
        t0 = float(self.base.min()) if len(self.base) else 0.0
        count = max(1, math.ceil(int(self.n.sum()) / max_results))
        edges = [t0 + math.floor(i * (self.t1 - t0) / count) for i in range(count + 1)]
        edges[0], edges[-1] = -math.inf, math.inf
        return list(itertools.pairwise(edges))


def _at(state: dict, pos: int) -> np.random.Generator:
    """A generator at `pos` 64-bit draws after `state` (PCG64 jumps there in O(log pos))."""
    bg = np.random.PCG64()
    bg.state = state
    return np.random.Generator(bg.advance(pos))


def _after(state: dict, draw, n: int, chunk: int = 1 << 20) -> dict:
    """The RNG state after `draw(generator, size)` has drawn n values from `state` (for draws
    whose count of 64-bit words varies: normals, exponentials), drawn a chunk at a time."""
    g = _at(state, 0)
    for c0 in range(0, n, chunk):
        draw(g, min(chunk, n - c0))
    return g.bit_generator.state


def generate(config: SynthConfig | None = None, out=None, progress: bool = True) -> dict:
    """Write the world's RIPE-Atlas ping results to `out` (.jsonl or .jsonl.gz),
    `<out>.world.json` and `<out>.geo.mmdb`; return a summary. Same config, byte-identical
    files."""
    from tqdm import tqdm

    t_begin = time.perf_counter()
    c = config or SynthConfig()
    if out is None:
        raise InputError("synth: an output path is required")
    out = Path(out)
    if out.is_dir() or not out.parent.is_dir():
        raise InputError(f"synth: cannot write {out} (not a file path in an existing directory)")
    w = World(c)
    msms, streams = _schedule(w, np.random.default_rng([c.seed, 0xA71A5]))
    mtab = np.array([m[:3] + m[4:5] + m[7:9] + (m[9],) for m in msms], dtype=np.int64)
    windows = streams.windows(WINDOW_RESULTS)
    n_res = n_pk = 0  # a first pass counts, so that each kind of draw can start where it was
    for a, b in windows:
        m = streams.results(a, b)["m"]
        n_res, n_pk = n_res + len(m), n_pk + int(mtab[m, 4].sum())
    # Packets and results draw, in this order, each from its own block of the stream: lost?,
    # the jitter law's normal, uniform and uniform, duplicate?, then per result the storage delay
    # and the last-time-sync age; normals and exponentials take a varying number of words, so
    # where the block after them starts is found by drawing them once.
    g_lost, g_z = _at(streams.origin, streams.end), _at(streams.origin, streams.end + n_pk)
    s_u = _after(g_z.bit_generator.state, lambda g, n: g.standard_normal(n), n_pk)
    g_u, g_v, g_dup, g_stored = (_at(s_u, i * n_pk) for i in range(4))
    g_lts = _at(_after(g_stored.bit_generator.state, lambda g, n: g.exponential(60, n), n_res), 0)
    addr = lambda x: w.addr4[x] if x >= 0 else w.addr6[-1 - x]  # noqa: E731
    tmp = out.with_name(out.name + ".tmp")
    bar = tqdm(total=n_res, desc="synth", unit=" results", disable=not progress)
    totals = dict(failed_packets=0, ipv6_packets=0, first_timestamp=None, last_timestamp=None)
    try:
        with open(tmp, "wb") as raw, (  # gzip without name or mtime: byte-identical reruns
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=5)
            if out.suffix == ".gz" else contextlib.nullcontext(raw)
        ) as fh:
            for a, b in windows:  # a time window at a time: memory flat in the number of packets
                r = streams.results(a, b)
                if len(r["t"]) == 0:
                    continue
                m, e, t = r["m"], r["e"], r["t"]
                order = np.lexsort((w.prb_id[e], mtab[m, 0], t))  # as a daily dump: by time
                m, e, t = m[order], e[order], t[order]
                d, af = mtab[m, 1], mtab[m, 2]
                tr, pr = w.truth_idx(e, d, af, t)
                npk = mtab[m, 4]
                rows = np.repeat(np.arange(len(t)), npk)
                n = len(rows)
                lost = g_lost.random(n) < tr.p_fail[rows]
                rtt = np.round(tr.draw(rows, g_z.standard_normal(n), g_u.random(n),
                                       g_v.random(n)), 6)  # Atlas reports ns digits
                dup = ~lost & (g_dup.random(n) < 2e-4)  # rare duplicate replies, late: not pings
                stored = (np.where(tr.p_fail >= 1, t + 3600, t)  # offline probes report late
                          + g_stored.exponential(60, len(t)) + 5).astype(np.int64)
                lts = np.minimum(g_lts.exponential(40, len(t)), 3000).astype(np.int64)
                totals["failed_packets"] += int(lost.sum())
                totals["ipv6_packets"] += int(npk[af == 6].sum())
                if totals["first_timestamp"] is None:
                    totals["first_timestamp"] = int(t[0])
                totals["last_timestamp"] = int(t[-1])
                cols = dict(m=m, e=e, t=t, d=d, af=af, npk=npk, rows=rows, lost=lost, rtt=rtt,
                            dup=dup, stored=stored, lts=lts, ttl=w.ttl0[d] - pr["hops"],
                            pub=np.where(af == 4, w.slot(e, t), -1 - w.slot(e, t)),  # <0: v6
                            dpub=np.where(af == 4, w.slot0[d], -1 - w.slot0[d]))
                for chunk in _records(w, mtab, cols, addr):
                    fh.write(chunk)
                    bar.update(chunk.count(b"\n"))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    os.replace(tmp, out)
    summary = dict(
        out=str(out), world=str(world_path(out)), geo_db=str(geo_db_path(out)), seed=c.seed,
        days=c.days,
        probes=int((w.kind <= ANCHOR).sum()), anchors=int((w.kind == ANCHOR).sum()),
        dual_stack_probes=int(((w.kind <= ANCHOR) & w.v6).sum()),
        servers=int((w.kind == SERVER).sum()), anycast_services=int((w.kind == ANYCAST).sum()),
        networks=len(w.as_kind), cities=int(len(np.unique(w.city[w.city >= 0]))),
        measurements=len(msms), results=n_res, packets=n_pk, **totals,
        bytes=out.stat().st_size, fingerprint=w.fingerprint())
    write_geo_db(w, geo_db_path(out))
    w.save(world_path(out), summary)
    summary["seconds"] = round(time.perf_counter() - t_begin, 2)
    return summary


def _records(w: World, mtab, cols: dict, addr, chunk: int = 20_000):
    """One window's results as RIPE Atlas JSON lines, `chunk` results (Python objects) at a time."""
    npk, rows, lost, rtt = cols["npk"], cols["rows"], cols["lost"], cols["rtt"]
    first = np.cumsum(npk) - npk
    ok = np.where(lost, 0.0, 1.0)
    rcvd = np.add.reduceat(ok, first).astype(np.int64)
    mn = np.fmin.reduceat(np.where(lost, np.nan, rtt), first)
    mx = np.fmax.reduceat(np.where(lost, np.nan, rtt), first)
    avg = np.add.reduceat(ok * rtt, first) / np.maximum(rcvd, 1)
    dups = {}
    for i in np.flatnonzero(cols["dup"]).tolist():
        late = round(float(rtt[i]) * 3 + 200, 6)
        dups.setdefault(int(rows[i]), []).append({"dup": 1, "rtt": late})
    n_res = len(npk)
    for c0 in range(0, n_res, chunk):
        c1 = min(n_res, c0 + chunk)
        p0, p1 = first[c0], first[c1 - 1] + npk[c1 - 1]
        ent = [{"x": "*"} if x else {"rtt": v}
               for x, v in zip(lost[p0:p1].tolist(), rtt[p0:p1].tolist(), strict=True)]
        per = [x[c0:c1].tolist() for x in (first - p0, npk, cols["m"], cols["e"], cols["t"],
                                           cols["af"], rcvd, mn, mx, avg, cols["stored"],
                                           cols["lts"], cols["ttl"], cols["pub"], cols["dpub"])]
        lines = []
        for i, (f0, n, mi, ei, ti, a, rc, lo, hi, av, st, lt, tl, sp, dp) in enumerate(
                zip(*per, strict=True), start=c0):
            mid, _, _, step, _, size, group = mtab[mi].tolist()
            fw, mver = FIRMWARE[w.fw[ei]]
            res = ent[f0: f0 + n] + dups.get(i, [])
            src, dst = addr(sp), addr(dp)
            rec = {"fw": fw, "mver": mver, "lts": lt, "dst_name": dst, "af": a,
                   "dst_addr": dst, "src_addr": (a == 4 and w.lan4[ei]) or src,
                   "proto": "ICMP"}
            if rc:
                rec["ttl"] = tl
            rec.update(size=size, result=res, dup=len(res) - n, rcvd=rc, sent=n,
                       min=lo if rc else -1, max=hi if rc else -1,
                       avg=round(av, 10) if rc else -1, msm_id=mid,
                       prb_id=int(w.prb_id[ei]), timestamp=ti, msm_name="Ping",
                       **{"from": src}, type="ping")
            if group:
                rec["group_id"] = mid
            if step:
                rec["step"] = step
            rec["stored_timestamp"] = st
            lines.append(orjson.dumps(rec))
        yield b"\n".join(lines) + b"\n"
