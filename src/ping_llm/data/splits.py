"""A prepared dataset's splits: their rules, the split hash, the invariants checked on the data.

Splits (deterministic: a hash of (seed, key), so the same input and seed give the same splits).
Every rule is keyed on the *probe* (prb_id where the table has it, else the source address; the
card counts which): NAT'd probes change public address, and an address key would let one probe
sit in train under one address and in a test split under another. Probes that share a source
address (several probes behind one NAT) are linked into one unit (connected components of the
probe-address graph, named by the smallest probe key) and the unit is what is hashed and held
out, so a held-out probe's addresses are not in train under another probe either.
  test_probe  units with u(seed, "probe", unit) < probe_fraction, under every address they
              used, plus units with no measurement before the val/time cuts: never in train
              under any address (cold start).
  test_time   measurements at or after the time cut t_min + (1 - time_fraction) (t_max - t_min)
              of probes that are in train, whatever address they used then.
  test_pair   (unit, dst) pairs with u(seed, "pair", unit, dst) < pair_fraction, before the
              time cut, whose unit and destination both keep train measurements; never in train.
  val         what training's periodic eval, early stopping, calibration and every choice of
              defaults use, built like test_pair and test_time and disjoint from both: pairs with
              pair_fraction <= u(seed, "pair", unit, dst) < pair_fraction + val_pair_fraction
              (before the cut), and the val_time_fraction of the time range just before the
              time cut (so train ends before val, and val before test_time).
  val_probe   the cold start to choose on, built like test_probe and disjoint from it: units
              with probe_fraction <= u(seed, "probe", unit) < probe_fraction + val_probe_fraction,
              under every address they used, never in train. (A drawn unit with no measurement
              before the cuts stays in test_probe, so test_probe is what it was without val_probe.)
  train       the rest. Drawn pairs whose endpoints would otherwise be unseen go back to train
              (that only adds to train, so the remaining held-out pairs stay valid).
u(seed, *keys) = the first 52 bits of md5("seed|key|...") / 2**52, so anyone can recompute it
(a unit is a probe key 'prb:<prb_id>' or a canonical source address; for the few probes that
share an address it is the smallest key of their unit).
The invariants (no test_probe or val_probe probe in train, none of either in the other, no
test_pair (probe, dst) in train, no test or val measurement in train) are then checked on the
written splits (`split_invariants`), recorded in the card, and checked again by `ping-llm
eval`. `since`/`until` keep only the measurements inside a time window (e.g. the first weeks
of a campaign, for the drift protocol).

`prepare` calls `assign` on its staged measurements and `split_invariants` on the splits it
wrote; `eval` runs `split_invariants` again on what it reads (`eval.leakcheck`). The rules are
described for users in docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from ping_llm.errors import InputError

SPLITS = ("train", "test_time", "test_probe", "test_pair", "val", "val_probe")  # index = split id
TEST_SPLITS = ("test_time", "test_pair", "test_probe")
COLD_SPLITS = ("test_probe", "val_probe")  # probes never in train: context is their own
CHOICE_SPLITS = ("val", "val_probe")  # what defaults are chosen on (known probes, new probes)


SPLIT_RULES = {
    "train": "everything not in a test or val split",
    "test_time": "event_time >= time_cut, unit in train (under any address)",
    "test_probe": "u(seed,'probe',unit) < probe_fraction, or unit with no measurement before "
    "the val/time cuts: never in train under any address",
    "test_pair": "u(seed,'pair',unit,dst) < pair_fraction, before time_cut, unit and dst in "
    "train",
    "val": "pair_fraction <= u(seed,'pair',unit,dst) < pair_fraction + val_pair_fraction before "
    "time_cut, or val_time_cut <= event_time < time_cut; unit in train",
    "val_probe": "probe_fraction <= u(seed,'probe',unit) < probe_fraction + val_probe_fraction, "
    "unit with a measurement before the val/time cuts: never in train under any address",
}


def probe_key_sql(prb_id: str = "prb_id", src: str = "src_addr") -> str:
    """The probe identity as a DuckDB expression: 'prb:<prb_id>', else the source address. The
    one definition prepare splits on and these invariants check."""
    return f"COALESCE('prb:' || {prb_id}::VARCHAR, {src})"


_PROBE = probe_key_sql()


def split_invariants(splits: dict, memory_limit: str | None = None, temp_dir=None) -> dict:
    """Check the split invariants on the data. splits: name -> canonical Arrow table or Parquet
    path, with at least "train". Returns {"checked": {invariant: count}, "violations": {...
    the nonzero ones}, "test_time_probes_not_in_train": n (a property of the rules, not a leak)}.
    memory_limit / temp_dir: DuckDB's, so prepare's bound on memory holds here too."""
    import duckdb

    con = duckdb.connect()
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    if temp_dir:
        con.execute(f"SET temp_directory = '{str(temp_dir).replace(chr(39), chr(39) * 2)}'")
    for name, x in splits.items():
        if isinstance(x, str | Path):
            path = str(x).replace("'", "''")
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{path}')")
        else:
            if "prb_id" not in x.column_names:  # no probe ids: the source address is the probe
                x = x.append_column("prb_id", pa.nulls(x.num_rows, pa.int64()))
            con.register(name, x)

    def one(q: str) -> int:
        return int(con.execute(q).fetchone()[0])

    train_probes = f"(SELECT DISTINCT {_PROBE} AS probe FROM train)"
    checked = {}
    # cold start and held-out pairs must stay out of train, and out of what is chosen on (val,
    # val_probe); the two cold-start splits share no probe
    for other in [x for x in ("train", "val", "val_probe") if x in splits]:
        for cold in [x for x in COLD_SPLITS if x in splits and x != other]:
            checked[f"{cold} probes in {other}"] = one(
                f"SELECT count(DISTINCT {_PROBE}) FROM {cold} WHERE {_PROBE} IN "
                f"(SELECT DISTINCT {_PROBE} FROM {other})")
            checked[f"{cold} source addresses in {other}"] = one(
                f"SELECT count(DISTINCT src_addr) FROM {cold} "
                f"WHERE src_addr IN (SELECT DISTINCT src_addr FROM {other})")
        if "test_pair" in splits:
            checked[f"test_pair (probe, dst) pairs in {other}"] = one(
                f"""SELECT count(*) FROM (SELECT DISTINCT {_PROBE} AS probe, dst_addr
                FROM test_pair) p JOIN (SELECT DISTINCT {_PROBE} AS probe, dst_addr FROM {other})
                t USING (probe, dst_addr)""")
    for name in splits:
        if name != "train":
            checked[f"{name} measurements in train"] = one(
                f"""SELECT count(*) FROM {name} a SEMI JOIN train b ON a.event_time = b.event_time
                AND a.src_addr = b.src_addr AND a.dst_addr = b.dst_addr AND a.rtt = b.rtt""")
    out = {"checked": checked, "violations": {k: v for k, v in checked.items() if v}}
    if "test_time" in splits:
        out["test_time_probes_not_in_train"] = one(
            f"SELECT count(DISTINCT {_PROBE}) FROM test_time WHERE {_PROBE} NOT IN {train_probes}")
    con.close()
    return out


_U01 = "(('0x' || substr(md5({}), 1, 13))::BIGINT / 4503599627370496.0)"


def u01(*keys) -> float:
    """The split hash in Python: md5 of '|'-joined keys -> [0, 1) (what the SQL computes)."""
    h = hashlib.md5("|".join(str(k) for k in keys).encode()).hexdigest()
    return int(h[:13], 16) / 2**52


def probe_units(con) -> tuple[int, int]:
    """Add column `unit` to m0: probes linked by a shared source address (two probes behind one
    NAT, seen under the same public address) form one unit, named by its smallest probe key.
    Splits hold out units, so a held-out probe's address is never a train probe's address
    either. Returns how many probes share their unit with another, and the largest unit's size
    (a chain of shared CGNAT addresses could link many probes: the card shows it)."""
    t = con.sql("SELECT DISTINCT probe, src FROM m0 ORDER BY probe, src").fetchall()
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for probe, src in t:  # connected components of the probe-address graph
        a, b = find(probe), find("addr:" + src)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[str, list[str]] = {}
    for probe in sorted({p for p, _ in t}):
        groups.setdefault(find(probe), []).append(probe)
    unit = {p: ps[0] for ps in groups.values() for p in ps}
    con.register("units_in", pa.table({"probe": list(unit), "unit": list(unit.values())}))
    con.execute("CREATE TABLE units AS SELECT * FROM units_in")
    con.unregister("units_in")
    con.execute("ALTER TABLE m0 ADD COLUMN unit VARCHAR")
    con.execute("UPDATE m0 SET unit = units.unit FROM units WHERE m0.probe = units.probe")
    con.execute("DROP TABLE units")
    return (sum(len(ps) for ps in groups.values() if len(ps) > 1),
            max((len(ps) for ps in groups.values()), default=0))


def assign(con, cfg) -> dict:
    """Table `m`: valid measurements with address ids, probe key and split id (rules: the module
    docstring), from prepare's staged tables `raw` and `addr`; cfg: a `prepare.PrepareConfig`.
    Everything is keyed on the probe, never on its address: a NAT'd probe that renumbers keeps
    one identity, so none of its addresses can carry it across a split."""
    con.execute(
        f"""CREATE TABLE m0 AS
        SELECT r.t, s.canon AS src, d.canon AS dst, r.v, r.rtt, r.prb_id, r.msm_id, r.size,
               s.id AS src_id, d.id AS dst_id, {probe_key_sql("r.prb_id", "s.canon")} AS probe
        FROM raw r JOIN addr s ON r.src = s.a AND r.v = s.v JOIN addr d ON r.dst = d.a AND r.v = d.v
        """
    )
    outside = 0
    if cfg.since is not None or cfg.until is not None:
        lo = -(2**62) if cfg.since is None else int(cfg.since)
        hi = 2**62 if cfg.until is None else int(cfg.until)
        outside = con.execute("DELETE FROM m0 WHERE t < $lo OR t >= $hi",
                              {"lo": lo, "hi": hi}).fetchone()[0]
    sharing, largest = probe_units(con)
    n = con.execute("SELECT count(*), min(t), max(t) FROM m0").fetchone()
    if n[0] == 0:
        raise InputError("no valid measurements in the input"
                         + (" inside --since/--until" if outside else ""))
    t_min, t_max = int(n[1]), int(n[2])
    t_cut = t_min + int(np.ceil((1 - cfg.time_fraction) * (t_max - t_min)))
    if cfg.time_fraction == 0:
        t_cut = t_max + 1
    t_vcut = t_cut - int(np.ceil(cfg.val_time_fraction * (t_max - t_min)))
    seed = str(cfg.seed)
    # probe units drawn for test_probe (kind 2), else for val_probe (kind 5): one draw, two
    # intervals, so test_probe does not depend on val_probe_fraction
    con.execute(
        f"""CREATE TABLE hs AS SELECT unit, (CASE WHEN u < $fp THEN 2 ELSE 5 END) AS kind
        FROM (SELECT unit, {_U01.format("$seed || '|probe|' || unit")} AS u
              FROM (SELECT DISTINCT unit FROM m0))
        WHERE u < $fp + $fv""",
        {"seed": seed, "fp": cfg.probe_fraction, "fv": cfg.val_probe_fraction},
    )
    # (probe, dst) pairs drawn for test_pair, else for val (one uniform draw, two intervals)
    con.execute(
        f"""CREATE TABLE hp AS SELECT unit, dst, (CASE WHEN u < $fp THEN 3 ELSE 4 END) AS kind
        FROM (SELECT unit, dst, {_U01.format("$seed || '|pair|' || unit || '|' || dst")} AS u
              FROM (SELECT DISTINCT unit, dst FROM m0))
        WHERE u < $fp + $fv""",
        {"seed": seed, "fp": cfg.pair_fraction, "fv": cfg.val_pair_fraction},
    )
    con.execute(
        """CREATE TABLE m1 AS SELECT m0.*, hs.unit IS NOT NULL AS held_probe,
               COALESCE(hs.kind, 0) AS probe_kind,
               COALESCE(hp.kind, 0) AS pair_kind, m0.t >= $cut AS late,
               m0.t >= $vcut AND m0.t < $cut AS vlate
        FROM m0 LEFT JOIN hs ON m0.unit = hs.unit
                LEFT JOIN hp ON m0.unit = hp.unit AND m0.dst = hp.dst""",
        {"cut": t_cut, "vcut": t_vcut},
    )
    # A drawn pair is held out only if its probe and its destination keep train measurements
    # without it; the others go back to train (that only adds to train, so every held-out pair
    # stays valid).
    base = "NOT held_probe AND NOT late AND NOT vlate AND pair_kind = 0"
    con.execute(
        f"""CREATE TABLE qp AS SELECT unit, dst, kind FROM hp
        WHERE unit IN (SELECT DISTINCT unit FROM m1 WHERE {base})
          AND dst IN (SELECT DISTINCT dst FROM m1 WHERE {base})"""
    )
    con.execute(
        """CREATE TABLE m2 AS SELECT m1.*, COALESCE(qp.kind, 0) AS q_kind
        FROM m1 LEFT JOIN qp ON m1.unit = qp.unit AND m1.dst = qp.dst"""
    )
    # units that would keep train measurements if not drawn for val_probe (those without are
    # cold start in test_probe, as they were before val_probe existed)
    con.execute("CREATE TABLE st AS SELECT DISTINCT unit FROM m2 "
                "WHERE probe_kind != 2 AND NOT late AND NOT vlate AND q_kind = 0")
    # precedence: held-out probe > val probe > after the cut > held-out pair > val pair > val
    # time > train; a probe that has no train measurement at all is cold start wherever its
    # rows fall.
    con.execute(
        """CREATE TABLE m AS
        SELECT t, m2.src, dst, v, rtt, prb_id, msm_id, size, src_id, dst_id, m2.probe,
            (CASE WHEN probe_kind = 2 OR st.unit IS NULL THEN 2
                  WHEN probe_kind = 5 THEN 5
                  WHEN late THEN 1
                  WHEN q_kind = 3 THEN 3
                  WHEN q_kind = 4 OR vlate THEN 4
                  ELSE 0 END)::TINYINT AS split,
            probe_kind = 2 AS held_probe
        FROM m2 LEFT JOIN st ON m2.unit = st.unit"""
    )
    for tmp in ("m0", "m1", "m2", "qp", "st"):
        con.execute(f"DROP TABLE {tmp}")
    late_only = con.execute(
        "SELECT count(*), count(DISTINCT probe) FROM m WHERE split = 2 AND NOT held_probe"
    ).fetchone()
    key = con.execute("SELECT count(*) FILTER (WHERE prb_id IS NOT NULL), "
                      "count(*) FILTER (WHERE prb_id IS NULL) FROM m").fetchone()
    return {
        "outside_time_window": int(outside),
        "probes_sharing_an_address": sharing,
        "largest_unit_probes": largest,
        "time_cut": t_cut,
        "val_time_cut": t_vcut,
        "t_min": t_min,
        "t_max": t_max,
        "probe_key": {"prb_id": int(key[0]), "source_address": int(key[1])},
        "held_out_units": con.execute("SELECT count(*) FROM hs WHERE kind = 2").fetchone()[0],
        "val_probe_units_drawn": con.execute("SELECT count(*) FROM hs WHERE kind = 5")
        .fetchone()[0],
        "held_out_pairs_drawn": con.execute("SELECT count(*) FROM hp WHERE kind = 3")
        .fetchone()[0],
        "val_pairs_drawn": con.execute("SELECT count(*) FROM hp WHERE kind = 4").fetchone()[0],
        "unseen_probes": int(late_only[1]),
        "unseen_probe_measurements": int(late_only[0]),
    }
