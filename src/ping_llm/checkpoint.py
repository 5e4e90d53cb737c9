"""The run directory: a checkpoint that describes itself, saved atomically, loaded without pickle.

Layout (everything a reader needs is plain JSON or safetensors)::

    RUN_DIR/
      config.json          {"model": GPTConfig.to_dict(), "train": TrainConfig as a dict}
      metrics.jsonl        one JSON object per line: {"kind": "train"|"eval", "step": ..., ...}
      checkpoint/          the latest complete checkpoint
        meta.json          format name + version, ping-llm/torch versions, step, world size,
                           trainer counters (tokens seen, train time, wandb run id), file list
        config.json        the config this checkpoint was trained with (same shape as above)
        model.safetensors  weights (fp32 state_dict of the bare GPT; no RoPE buffers)
        optimizer.safetensors + optimizer.json
                           optimiser state: tensors in safetensors (key "opt{i}/{param}/{name}"),
                           param_groups and scalar state in JSON
        loader.json        {"world_size": W, "ranks": [loader.get_state() of rank 0..W-1]}
        rng.json           per rank: torch CPU/CUDA generator states (base64 bytes), numpy's
                           MT19937 state, python's `random` state
      checkpoint.tmp/      only while a save is in progress (never read)
      checkpoint.old/      only during the swap (read if `checkpoint/` is missing: crash mid-swap)
      train.lock           the pid of the trainer writing the run (see RunLock)
      kept/step-NNNNNNN/   with --keep-every: weights + meta + config of earlier steps

Atomic save: everything is written into `checkpoint.tmp/`, each file fsynced, `meta.json` last;
then `checkpoint/` -> `checkpoint.old/`, `checkpoint.tmp/` -> `checkpoint/`, fsync the run
directory, delete `checkpoint.old/`. A crash at any point leaves either the previous or the new
checkpoint complete and findable by `find_checkpoint`. The run directory must be on a filesystem
shared by all ranks when resuming a multi-node run (every rank reads it).

Loading never unpickles: safetensors for tensors, json for everything else. Optimiser state is
rebuilt into the dict shape `Optimizer.load_state_dict` expects.
"""

from __future__ import annotations

import base64
import datetime
import fcntl
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ping_llm import __version__
from ping_llm.errors import InputError

FORMAT_NAME = "ping-llm-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoint"
_TMP_DIR = "checkpoint.tmp"
_OLD_DIR = "checkpoint.old"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "train.lock"


# ------------------------------------------------------------------------------------------------
# small file helpers


def _fsync_path(path: Path) -> None:
    """fsync a file or directory (directories: so that renames/creates inside it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the data files are synced
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to `path` via a temp file + rename (readers never see a half-written file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _write_json(tmp, obj)
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path} is missing: not a complete ping-llm checkpoint") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e})") from None


# ------------------------------------------------------------------------------------------------
# optimiser state <-> (safetensors dict, JSON)


def _json_safe(v, where: str):
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list | tuple):
        return [_json_safe(x, where) for x in v]
    raise TypeError(f"optimizer state {where} holds a {type(v).__name__}, which is not JSON-able")


def optimizer_state_to_files(optimizers) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split each optimiser's state_dict into tensors (for safetensors) and a JSON description."""
    tensors: dict[str, torch.Tensor] = {}
    described = []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        state = {}
        for pid, st in sd["state"].items():
            entry = {}
            for name, v in st.items():
                if torch.is_tensor(v):
                    key = f"opt{i}/{pid}/{name}"
                    tensors[key] = v.detach().to("cpu").contiguous()
                    entry[name] = {"tensor": key}
                else:
                    entry[name] = {"value": _json_safe(v, f"opt{i}/{pid}/{name}")}
            state[str(pid)] = entry
        groups = [
            {k: _json_safe(v, f"opt{i} param_group {k}") for k, v in g.items()}
            for g in sd["param_groups"]
        ]
        described.append({"type": type(opt).__name__, "state": state, "param_groups": groups})
    return tensors, described


def optimizer_state_from_files(
    optimizers, tensors: dict[str, torch.Tensor], described: list[dict]
) -> None:
    """Load the state written by `optimizer_state_to_files` into freshly built optimisers.

    Only per-parameter state (momentum buffers, Adam moments, step counts) comes from the
    checkpoint; hyperparameters (lr, initial_lr, betas, weight decay ...) stay those of the live
    optimisers, i.e. of the current config, so a resumed run can change its learning rates.
    """
    if len(described) != len(optimizers):
        raise InputError(
            f"checkpoint has {len(described)} optimizers, the model has {len(optimizers)}"
        )
    for i, (opt, d) in enumerate(zip(optimizers, described, strict=True)):
        if d["type"] != type(opt).__name__:
            raise InputError(f"optimizer {i} is {type(opt).__name__}, checkpoint has {d['type']}")
        live = opt.state_dict()["param_groups"]
        if len(live) != len(d["param_groups"]):
            raise InputError(f"optimizer {i}: param group count differs from the checkpoint")
        groups = []
        for lg, sg in zip(live, d["param_groups"], strict=True):
            g = dict(sg)
            for k, v in g.items():  # JSON turned tuples (AdamW betas) into lists; undo that
                if isinstance(lg.get(k), tuple) and isinstance(v, list):
                    g[k] = tuple(v)
            groups.append(g)
        state = {}
        for pid, entry in d["state"].items():
            st = {}
            for name, spec in entry.items():
                st[name] = tensors[spec["tensor"]] if "tensor" in spec else spec["value"]
            state[int(pid)] = st
        current = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict({"state": state, "param_groups": groups})
        for g, hyper in zip(opt.param_groups, current, strict=True):
            g.update(hyper)


# ------------------------------------------------------------------------------------------------
# RNG state <-> JSON


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict:
    """This process's RNG states (torch CPU + all CUDA devices, numpy, python), JSON-able."""
    # The legacy global numpy state is exactly what third-party code draws from: save it.
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    version, pystate, gauss_next = random.getstate()
    return {
        "torch_cpu": _b64(torch.get_rng_state()),
        "torch_cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
        "numpy": {
            "name": name,
            "keys": base64.b64encode(np.asarray(keys, dtype="<u4").tobytes()).decode("ascii"),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(pystate), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    cuda = state.get("torch_cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
    n = state["numpy"]
    keys = np.frombuffer(base64.b64decode(n["keys"]), dtype="<u4").astype(np.uint32)
    np.random.set_state(  # noqa: NPY002
        (n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ------------------------------------------------------------------------------------------------
# save / find / load


def save_checkpoint(
    run_dir,
    *,
    model_state: dict[str, torch.Tensor],
    config: dict,
    optimizers,
    loader_states: list[dict],
    rng_states: list[dict],
    step: int,
    trainer: dict | None = None,
) -> Path:
    """Atomically replace RUN_DIR/checkpoint with a new one; returns its path.

    model_state: the bare model's state_dict (not DDP/compiled wrappers). loader_states and
    rng_states: one entry per data-parallel rank, in rank order. trainer: small JSON-able
    counters (tokens seen, train time, wandb id) kept in meta.json.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp, final, old = run_dir / _TMP_DIR, run_dir / CHECKPOINT_DIR, run_dir / _OLD_DIR
    if tmp.exists():  # leftover of a crash mid-save: incomplete by definition
        shutil.rmtree(tmp)
    tmp.mkdir()

    weights = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    opt_tensors, opt_json = optimizer_state_to_files(optimizers)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"step": str(step)})
    for name in ("model.safetensors", "optimizer.safetensors"):
        _fsync_path(tmp / name)
    _write_json(tmp / "optimizer.json", opt_json)
    _write_json(tmp / CONFIG_FILE, config)
    _write_json(tmp / "loader.json", {"world_size": len(loader_states), "ranks": loader_states})
    _write_json(tmp / "rng.json", {"world_size": len(rng_states), "ranks": rng_states})
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "ping_llm_version": __version__,
        "torch_version": torch.__version__,
        "step": int(step),
        "world_size": len(loader_states),
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "trainer": trainer or {},
        "files": sorted(p.name for p in tmp.iterdir()) + ["meta.json"],
    }
    _write_json(tmp / "meta.json", meta)  # written last: its presence marks a complete directory
    _fsync_path(tmp)

    if old.exists() and final.exists():  # a previous swap finished but its cleanup did not
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


KEPT_DIR = "kept"


def keep_weights(run_dir, step: int) -> Path:
    """Copy the latest checkpoint's weights, meta and config to RUN/kept/step-NNNNNNN/ (no
    optimizer state: enough to load and evaluate it, e.g. for a learning curve). Atomic."""
    src = Path(run_dir) / CHECKPOINT_DIR
    dst = Path(run_dir) / KEPT_DIR / f"step-{step:07d}"
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("model.safetensors", "meta.json", CONFIG_FILE):
        shutil.copyfile(src / name, tmp / name)
        _fsync_path(tmp / name)
    shutil.rmtree(dst, ignore_errors=True)
    os.rename(tmp, dst)
    return dst


def kept_checkpoints(run_dir) -> list[Path]:
    """The kept checkpoint directories of a run, by step."""
    root = Path(run_dir) / KEPT_DIR
    return sorted(p for p in root.glob("step-*") if (p / "meta.json").is_file()
                  and not p.name.endswith(".tmp")) if root.is_dir() else []


def find_checkpoint(path) -> Path | None:
    """The complete checkpoint directory for a run dir (or a checkpoint dir itself), else None."""
    path = Path(path)
    for cand in (path, path / CHECKPOINT_DIR, path / _OLD_DIR):
        if (cand / "meta.json").is_file() and cand.name != _TMP_DIR:
            return cand
    return None


@dataclass
class Checkpoint:
    """Everything `save_checkpoint` wrote, read back (tensors on CPU)."""

    path: Path
    meta: dict
    config: dict
    model_state: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    optimizer_json: list[dict]
    loader_states: list[dict]
    rng_states: list[dict]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def load_optimizers(self, optimizers) -> None:
        optimizer_state_from_files(optimizers, self.optimizer_tensors, self.optimizer_json)


def read_meta(ckpt_dir: Path) -> dict:
    meta = _read_json(Path(ckpt_dir) / "meta.json")
    if meta.get("format") != FORMAT_NAME:
        raise InputError(f"{ckpt_dir} is not a ping-llm checkpoint (meta.json format field)")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise InputError(
            f"{ckpt_dir} has checkpoint format {meta['format_version']}; this ping-llm "
            f"({__version__}) reads up to {FORMAT_VERSION}: upgrade ping-llm"
        )
    return meta


def read_config(path) -> dict:
    """config.json ({"model": ..., "train": ...}) of a run dir's checkpoint or a checkpoint dir."""
    ckpt = _require(path)
    read_meta(ckpt)
    return _read_json(ckpt / CONFIG_FILE)


def _require(path) -> Path:
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise InputError(f"no ping-llm checkpoint in {path} (expected {path}/checkpoint/meta.json)")
    return ckpt


def _load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=device)
    except FileNotFoundError:
        raise InputError(f"{path} is missing: the checkpoint is incomplete") from None
    except SafetensorError as e:  # truncated or overwritten: say which file
        raise InputError(
            f"{path} is damaged ({type(e).__name__}: {e}); restore it or train again"
        ) from None


def load_checkpoint(path) -> Checkpoint:
    """Read the complete checkpoint of a run dir (or of a checkpoint dir); tensors on CPU."""
    ckpt = _require(path)
    meta = read_meta(ckpt)
    return Checkpoint(
        path=ckpt,
        meta=meta,
        config=_read_json(ckpt / CONFIG_FILE),
        model_state=_load_tensors(ckpt / "model.safetensors"),
        optimizer_tensors=_load_tensors(ckpt / "optimizer.safetensors"),
        optimizer_json=_read_json(ckpt / "optimizer.json"),
        loader_states=_read_json(ckpt / "loader.json")["ranks"],
        rng_states=_read_json(ckpt / "rng.json")["ranks"],
    )


def check_knowledge(run_config: dict, knowledge) -> None:
    """Refuse an address-knowledge database other than the one the run trained with."""
    want = run_config.get("knowledge") or {}
    have = knowledge.describe()
    if want.get("sha256") != have["sha256"]:
        raise InputError(
            f"this run was trained with {want.get('name')} built {want.get('build_date')} "
            f"(sha256 {str(want.get('sha256'))[:12]}…, {want.get('path')}); {have['path']} is "
            f"{have['name']} built {have['build_date']} (sha256 {have['sha256'][:12]}…): "
            "pass --geo-db with the run's database")


def load_model(run_dir, device="cpu", geo_db=None):
    """(GPT in eval mode on `device`, GPTConfig) from a run dir or checkpoint dir. No pickle.

    A model that reads address knowledge gets its database attached: geo_db if given, else the
    file the run recorded, else the packaged default; it must be the run's (same sha256)."""
    from ping_llm.model import GPT, GPTConfig
    from ping_llm.runtime import resolve_device

    device = resolve_device(device)
    ckpt = _require(run_dir)
    read_meta(ckpt)
    run_config = _read_json(ckpt / CONFIG_FILE)
    config = GPTConfig.from_dict(run_config["model"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # fills the non-persistent RoPE tables; weights are overwritten next
    state = _load_tensors(ckpt / "model.safetensors", str(device))
    model.load_state_dict(state, strict=True)
    model.eval()
    if config.knowledge_dim:
        from ping_llm.knowledge import AddressKnowledge

        recorded = (run_config.get("knowledge") or {}).get("path")
        if geo_db is None and recorded and not Path(recorded).exists():
            recorded = None  # moved to another machine: the packaged default, if it matches
        model.knowledge = AddressKnowledge.open(geo_db or recorded)
        check_knowledge(run_config, model.knowledge)
    return model, config


class RunLock:
    """One trainer per run directory: an exclusive advisory lock (flock) on RUN_DIR/train.lock,
    which holds the owner's pid. The kernel drops the lock when the process ends in any way, so a
    killed trainer never leaves a stale one; a second trainer gets InputError naming the pid."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self._fh = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise InputError(
                f"{self.path.parent} is being written by another trainer (pid {holder}); "
                "wait for it to finish or stop it, or choose another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops the flock; the file stays (harmless, reused)
            self._fh = None


# ------------------------------------------------------------------------------------------------
# metrics.jsonl


def append_metrics(run_dir, record: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(run_dir, max_step: int) -> None:
    """Drop records after `max_step` (logged after the checkpoint a resumed run restarts from),
    so that a resumed run's metrics.jsonl reads as if it had never been interrupted."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if int(json.loads(ln).get("step", 0)) <= max_step:
                keep.append(ln)
        except (json.JSONDecodeError, ValueError, TypeError):
            continue  # a torn last line from a crash
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
