"""The training loop: one code path for 1 CPU, 1 GPU, N GPUs and N nodes (torchrun / DDP).

`train(TrainConfig(...))` builds the GPT (`ping_llm.model`), its optimisers (`ping_llm.optim`:
Muon + AdamW, warmup–stable–decay), the data loaders (by default the first half of the steps on
256-token contexts: `loader.CurriculumLoader`), and runs nanochat's loop: gradient
accumulation to a global batch given in tokens, bf16 autocast on CUDA, optional torch.compile,
gradient clipping, eval loss on a fixed held-out set, metrics to stdout / metrics.jsonl / wandb,
and self-describing, atomic, exactly resumable checkpoints (`ping_llm.checkpoint`).

Distributed: when WORLD_SIZE > 1 (set by torchrun) the process group is initialised from the
environment (NCCL on CUDA, gloo otherwise), the model is wrapped in DDP, and gradients are
all-reduced on the last micro-step only (`no_sync` on the others). The global batch is
`total_batch_tokens = device_batch_size x sequence_len x grad_accum_steps x world_size`, so the
same config gives the same optimisation on 1 process or N (up to float summation order).

Loader contract (the real one is `data.loader.build_loader`; `data.markov.SyntheticLoader` is
the reference implementation used by tests and benchmarks)::

    build_loader(data_dir, split, batch_size, seq_len, seed, rank, world_size) -> loader
    iter(loader) is loader; next(loader) -> (inputs, targets)   int64 CPU tensors, shape (B, T)
        targets[b, t] is the token after inputs[b, t], or -1 where there is no target (unused
        positions); the loader never ends (it cycles epochs), and every batch has >= 1 target.
    loader.get_state() -> dict    JSON-serialisable; the position *after the batches already
        returned by next()* (not what a prefetcher has read ahead)
    loader.set_state(dict)        continue exactly after those batches

Sharding: the loader of (seed, split) defines one global sequence of micro-batches that does not
depend on the world size; rank r of W yields global micro-batches r, r + W, r + 2W, ... Then one
optimiser step consumes the same multiset of micro-batches on 1 process with accumulation
k x W as on W processes with accumulation k each (the DDP test checks exactly this). With grain,
build the batched dataset first and then take `[rank::world_size]` of it. The held-out set is the
first `eval_batches` global micro-batches of the `eval_split` loader, built with the same seed;
it is read once and kept in memory, so every evaluation sees the same batches.

MFU: achieved FLOP/s (model.estimate_flops_per_token() x tokens/s) over the peak dense bf16
tensor FLOP/s of the devices (`PEAK_BF16_FLOPS`, matched on the CUDA device name). CPUs have no
meaningful single number (it depends on cores, clock and SIMD width), so MFU is null on CPU and
on GPUs not in the table unless `peak_flops` is given (benchmarks/bench_train.py measures the
CPU's achievable fp32 matmul rate and passes that).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ping_llm import checkpoint as ckpt_mod
from ping_llm.config import (
    LEGACY_DEFAULTS,
    RESUME_FIXED,
    TrainConfig,
    grad_accum_steps,
    mixture,
    planned_warmup,
    seq_warmup_steps,
)
from ping_llm.data.markov import mix_seed
from ping_llm.errors import InputError
from ping_llm.model import GPT, GPTConfig
from ping_llm.optim import Muon, build_optimizers, lr_multiplier, muon_momentum
from ping_llm.runtime import (
    Dist,
    StopFlag,
    all_gather,
    all_reduce,
    barrier,
    log0,
    peak_flops_for,
    progress_bar,
    setup,
)
from ping_llm.tokens import result_targets

# ------------------------------------------------------------------------------------------------
# errors


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is left as it was."""

    def __init__(self, message: str, step: int, checkpoint_step: int | None):
        super().__init__(message)
        self.step, self.checkpoint_step = step, checkpoint_step


# ------------------------------------------------------------------------------------------------
# the loop


def _build_data_loaders(cfg: TrainConfig, seq_len: int, accum: int, warmup: int, d: Dist):
    if cfg.data_dir is None:
        raise InputError("no data: give data_dir (a prepared dataset) or pass loader=")
    data = Path(cfg.data_dir)
    if not (data / "card.json").is_file():
        raise InputError(f"{data} is not a prepared dataset (no card.json); run `ping-llm prepare`")
    from ping_llm.data.loader import CurriculumLoader, MixtureLoader, SamplerConfig, build_loader

    def make(split, batch_size=cfg.device_batch_size, length=seq_len, data=data, **kw):
        return build_loader(
            str(data), split, batch_size, length, cfg.seed, d.rank, d.world_size, **kw
        )

    sources, weights = mixture(cfg)

    def make_train(batch_size=cfg.device_batch_size, length=seq_len):
        sampler = SamplerConfig(seq_len=length, readdress_src=cfg.readdress_src,
                                readdress_dst=cfg.readdress_dst,
                                readdress_knowledge=cfg.readdress_knowledge)
        loaders = [make("train", batch_size, length, data=p, config=sampler) for p in sources]
        if len(loaders) == 1:
            return loaders[0]
        return MixtureLoader(loaders, weights, cfg.seed, d.rank)

    # The held-out set is read once (a few batches): no worker processes for it. It is never
    # re-addressed: it measures the real task.
    held_out = make(cfg.eval_split, worker_count=0) if cfg.eval_every else None
    if warmup == 0:
        return make_train(), held_out
    short = cfg.seq_warmup_len
    rows = cfg.device_batch_size * (seq_len // short)  # same tokens per micro-batch
    log0(d, f"sequence-length warmup: steps 1..{warmup} on {short}-token contexts "
            f"({rows} rows per micro-batch), then {seq_len}")
    curriculum = CurriculumLoader(make_train(rows, short), make_train, warmup * accum)
    return curriculum, held_out


def _init_from_parent(cfg: TrainConfig, raw, optimizers, gpt_config, d: Dist) -> list[dict]:
    """--init-from: the parent run's weights (and, with init_optimizer, its optimizer moments)
    into this new run. Returns the lineage: the parent's entry, then the parent's own lineage."""
    parent = ckpt_mod.load_checkpoint(cfg.init_from)
    if GPTConfig.from_dict(parent.config["model"]) != gpt_config:  # older runs: fewer fields
        raise InputError(
            f"--init-from {cfg.init_from}: its model is {parent.config['model']}, this run's is "
            f"{gpt_config.to_dict()}; leave out --preset/--model to take the parent's")
    if raw.knowledge is not None:
        ckpt_mod.check_knowledge(parent.config, raw.knowledge)
    raw.load_state_dict({k: v.to(d.device) for k, v in parent.model_state.items()})
    if cfg.init_optimizer:
        own = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
               for opt in optimizers]
        parent.load_optimizers(optimizers)
        for opt, groups in zip(optimizers, own, strict=True):  # moments the parent's,
            for g, mine in zip(opt.param_groups, groups, strict=True):  # rates this run's
                g.update(mine)
    dataset = parent.config.get("dataset") or {}
    entry = {
        "run": str(Path(cfg.init_from).resolve()),
        "step": parent.step,
        "data_dir": parent.config["train"].get("data_dir"),
        "fingerprint": dataset.get("train_fingerprint"),
        "split_fingerprints": dataset.get("split_fingerprints"),
    }
    log0(d, f"init from {cfg.init_from} at step {parent.step}"
            f"{' with its optimizer state' if cfg.init_optimizer else ''}")
    return [entry, *parent.config.get("mixture", []), *parent.config.get("lineage", [])]


def _held_out_batches(eval_loader, cfg: TrainConfig, d: Dist) -> list:
    """This rank's share of the fixed held-out set: global micro-batches r, r+W, ... < n."""
    n_local = len(range(d.rank, cfg.eval_batches, d.world_size))
    batches = []
    for _ in range(n_local):
        try:
            batches.append(next(eval_loader))
        except StopIteration:
            break
    return batches


@torch.no_grad()
def _evaluate(model, batches, device, autocast, d: Dist) -> tuple[float, int]:
    """Token-weighted mean loss over the held-out set, all ranks together."""
    was_training = model.training
    model.eval()
    acc = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, token count)
    for x, y in batches:
        feats = address_features(model, x)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            _, loss = model(x, y, loss_reduction="sum", feats=feats)
        acc[0] += loss.double()
        acc[1] += (y != -1).sum()
    all_reduce(acc, d)
    model.train(was_training)
    total, count = acc.tolist()
    return (total / count if count else float("nan")), int(count)


def address_features(model, x: torch.Tensor):
    """The address-knowledge features of a CPU batch for `model` (None when it has none),
    computed before the batch moves to the device (the database lookups run on the CPU)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):  # DDP / compile wrappers
        model = getattr(model, "module", None) or model._orig_mod
    return model.address_features(x) if model.config.knowledge_dim else None


def _check_resume(ckpt, cfg: TrainConfig, d: Dist) -> None:
    old = {**LEGACY_DEFAULTS, **ckpt.config["train"]}
    bad = [k for k in RESUME_FIXED if old.get(k) != getattr(cfg, k)]
    if bad:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in bad)
        raise InputError(f"cannot resume {ckpt.path} with a different {diffs}")
    if len(ckpt.loader_states) != d.world_size:
        raise InputError(
            f"{ckpt.path} was written by {len(ckpt.loader_states)} data-parallel ranks; resuming "
            f"on {d.world_size} would change the data order. Resume with the same world size."
        )
    changed = [k for k in old if k not in ("resume", "stop_at", "time_limit_s")
               and old.get(k) != getattr(cfg, k, None)]
    if changed:
        log0(d, f"resume: changed settings {', '.join(changed)} (the run no longer replays "
                "exactly an uninterrupted one if these affect optimisation)")


@dataclass
class _Run:
    """What one training process holds between steps: built by `_setup`, advanced by `_step`."""

    cfg: TrainConfig
    d: Dist
    run_dir: Path | None = None
    lock: object = None  # checkpoint.RunLock of the run directory (rank 0)
    wb: object = None  # the wandb run, when logging to wandb
    gpt_config: object = None
    accum: int = 1  # micro-batches per optimiser step on each rank
    warmup: int = 0  # optimiser steps on short contexts (seq_warmup_steps)
    use_bf16: bool = False
    model: torch.nn.Module | None = None  # what runs the step: compiled and/or DDP-wrapped
    raw: torch.nn.Module | None = None  # the GPT itself (its state is what is saved)
    eval_model: torch.nn.Module | None = None  # compiled, not DDP-wrapped
    optimizers: list = field(default_factory=list)
    loader: object = None
    eval_batches: list = field(default_factory=list)
    full_config: dict = field(default_factory=dict)  # written to RUN/config.json
    trainer: dict = field(default_factory=dict)  # tokens seen, training time, ... (checkpointed)
    tokens_per_step: int = 0
    flops_per_token: float = 0.0
    peak: float | None = None  # peak FLOP/s per device, for MFU
    step: int = 0
    start_step: int = 0
    last_saved: int | None = None
    last_eval: float | None = None
    last_loss: float | None = None

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def train(config: TrainConfig, *, loader=None, eval_loader=None) -> dict:
    """Train (or resume) a run; returns a summary dict (also printed by `ping-llm train --json`).

    loader / eval_loader: objects following the loader contract (module docstring), already
    sharded for this process's rank; when None they are built from config.data_dir.
    Raises InputError for bad config/data, TrainingDiverged on NaN/inf loss.
    """
    cfg = config
    r = _Run(cfg, setup(cfg.device))
    try:
        _setup(r, loader, eval_loader)
        r.model.train()
        if r.start_step == 0:
            _maybe_eval(r, final=False)
        stopped, step_times, t_start = None, [], time.perf_counter()
        budget_s = cfg.time_budget_s or math.inf
        budget_done = r.trainer["train_time_s"] >= budget_s  # a resumed run that already ended
        with StopFlag() as flag:
            progress = progress_bar(r.d, cfg.steps, r.start_step)
            while r.step < cfg.steps and not budget_done:
                t0 = time.perf_counter()
                stats = _step(r, flag, t_start, t0, budget_s)
                dt = time.perf_counter() - t0
                r.trainer["tokens_seen"] += r.tokens_per_step
                r.trainer["train_time_s"] += dt
                budget_done = stats["spent"] >= 1.0  # the ranks' agreed value, not each clock
                if budget_done:  # recorded, so that a resumed run knows it is complete
                    r.trainer["train_time_s"] = max(r.trainer["train_time_s"], cfg.time_budget_s)
                step_times.append(dt)
                progress.update(1)
                if (r.step % cfg.log_every == 0 or r.step == cfg.steps or stats["stop"]
                        or budget_done):
                    _log_step(r, stats, dt)
                done = r.step == cfg.steps or budget_done
                _maybe_eval(r, final=done)
                if stats["stop"] and not done:
                    stopped = (flag.signal_name if flag.signal_name is not None
                               else "stop_at" if cfg.stop_at is not None and r.step >= cfg.stop_at
                               else "time_limit")
                keep = cfg.keep_every and r.step % cfg.keep_every == 0
                if done or stopped or keep or (cfg.save_every and r.step % cfg.save_every == 0):
                    _save(r)
                if stopped:
                    log0(r.d, f"stopped ({stopped}) after step {r.step}; checkpoint saved in "
                              f"{r.run_dir}; continue with --resume")
                    break
            progress.close()
        summary = _summary(r, stopped, budget_done, step_times, time.perf_counter() - t_start)
        if r.d.owns_group:
            barrier(r.d)  # nobody tears down the group while a peer still talks (gloo aborts)
        return summary
    finally:
        if r.wb is not None:
            r.wb.finish()
        if r.lock is not None:
            r.lock.release()
        if r.d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# setup: run directory, data, model and optimisers, the run's config, logging


def _setup(r: _Run, loader, eval_loader) -> None:
    cfg, d = r.cfg, r.d
    r.gpt_config = cfg.gpt_config()
    T = r.gpt_config.sequence_len
    r.accum = grad_accum_steps(cfg, T, d.world_size)
    if cfg.dtype == "bfloat16" and d.device.type != "cuda":
        raise InputError("bf16 autocast is for CUDA only; use dtype auto or float32 on CPU")
    r.use_bf16 = d.device.type == "cuda" and cfg.dtype in ("auto", "bfloat16")
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls that remain (NS on fp32)
        torch.backends.cudnn.allow_tf32 = True

    ckpt = _open_run_dir(r)
    if loader is None:
        r.warmup = seq_warmup_steps(cfg, T)
        if ckpt is not None:  # extended (more --steps): the warmup keeps its first plan
            r.warmup = planned_warmup(ckpt, T)
        loader, eval_loader = _build_data_loaders(cfg, T, r.accum, r.warmup, d)
    r.loader = loader

    _build_model(r)
    r.trainer = {"tokens_seen": 0, "train_time_s": 0.0, "wandb_id": None,
                 "seq_warmup_steps": r.warmup}
    if ckpt is not None:
        if r.raw.knowledge is not None:
            ckpt_mod.check_knowledge(ckpt.config, r.raw.knowledge)
        r.raw.load_state_dict({k: v.to(d.device) for k, v in ckpt.model_state.items()})
        ckpt.load_optimizers(r.optimizers)
        loader.set_state(ckpt.loader_states[d.rank])
        ckpt_mod.restore_rng_state(ckpt.rng_states[d.rank])
        r.step = r.start_step = r.last_saved = ckpt.step
        r.trainer.update(ckpt.meta.get("trainer", {}))
        log0(d, f"resumed from {ckpt.path} at step {r.start_step}")
        lineage = ckpt.config.get("lineage", [])
    else:
        torch.manual_seed(mix_seed(cfg.seed, "rank", d.rank))
        lineage = []
        if cfg.init_from is not None:
            lineage = _init_from_parent(cfg, r.raw, r.optimizers, r.gpt_config, d)
    del ckpt  # the CPU copies of weights and optimizer state

    if cfg.compile:
        r.model = torch.compile(r.model)
    r.eval_model = r.model
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        r.model = DDP(r.model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    r.full_config = _run_config(cfg, r.gpt_config, r.raw, lineage)
    if r.run_dir is not None and d.master:
        r.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_mod.write_json_atomic(r.run_dir / ckpt_mod.CONFIG_FILE, r.full_config)
        ckpt_mod.truncate_metrics(r.run_dir, r.start_step)

    n_params = r.raw.num_params()
    r.flops_per_token = r.raw.estimate_flops_per_token()
    r.peak = cfg.peak_flops or peak_flops_for(d.device)
    r.tokens_per_step = r.accum * cfg.device_batch_size * T * d.world_size
    log0(d, f"model {cfg.preset} {r.gpt_config.to_dict()} | {n_params:,} params | "
            f"{r.flops_per_token / 1e6:.1f} MFLOP/token")
    log0(d, f"device {d.device} x{d.world_size} | bf16 {r.use_bf16} | compile {cfg.compile} | "
            f"batch {cfg.device_batch_size}x{T} x accum {r.accum} x world {d.world_size} = "
            f"{r.tokens_per_step:,} tokens/step | steps {r.start_step}->{cfg.steps}")
    if r.peak is None:
        log0(d, f"MFU: no peak FLOP/s known for {d.device}; pass peak_flops to get one")
    _start_wandb(r)
    if eval_loader is not None:  # read once and cached; the loader itself is then released
        r.eval_batches = _held_out_batches(eval_loader, cfg, d)


def _open_run_dir(r: _Run):
    """Lock the run directory (rank 0) and load its checkpoint when resuming (else None)."""
    cfg, d = r.cfg, r.d
    r.run_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    if r.run_dir is None:
        return None
    if d.master:
        r.lock = ckpt_mod.RunLock(r.run_dir)
        r.lock.acquire()
    found = ckpt_mod.find_checkpoint(r.run_dir)
    if found is not None and not cfg.resume:
        step = ckpt_mod.read_meta(found)["step"]
        raise InputError(f"{r.run_dir} already holds a checkpoint (step {step}); pass --resume "
                         "to continue it or choose another --out")
    if found is None:
        if cfg.resume:
            log0(d, f"resume: no checkpoint in {r.run_dir}, starting a new run")
        return None
    ckpt = ckpt_mod.load_checkpoint(found)
    _check_resume(ckpt, cfg, d)
    return ckpt


def _build_model(r: _Run) -> None:
    cfg = r.cfg
    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(cfg.seed)
    r.model = r.raw = GPT(r.gpt_config).to(r.d.device)
    if r.gpt_config.knowledge_dim:
        from ping_llm.knowledge import AddressKnowledge

        r.raw.knowledge = AddressKnowledge.open(cfg.geo_db)
    r.optimizers = build_optimizers(
        r.raw, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
        unembedding_lr=cfg.unembedding_lr, memory_lr=cfg.memory_lr,
        weight_decay=cfg.weight_decay,
    )


def _run_config(cfg: TrainConfig, gpt_config, raw, lineage: list) -> dict:
    """RUN/config.json: the model, the training config, and what eval's leak check follows."""
    out = {"model": gpt_config.to_dict(), "train": cfg.to_dict()}
    if lineage:  # the runs whose weights this one started from, nearest first
        out["lineage"] = lineage
    if raw.knowledge is not None:  # which database: queries must open the same one
        out["knowledge"] = raw.knowledge.describe()
    if cfg.data_dir is not None:  # what `eval` checks against to refuse leaky comparisons
        from ping_llm.data.prepare import load_card

        card = load_card(cfg.data_dir)
        out["dataset"] = {
            "train_fingerprint": card["splits"]["train"]["fingerprint"],
            "split_fingerprints": {k: v.get("fingerprint") for k, v in card["splits"].items()},
        }
        if cfg.extra_data:  # the other datasets of the mixture: eval checks them too
            sources, weights = mixture(cfg)
            out["mixture"] = [
                {"data_dir": str(p), "weight": w,
                 "fingerprint": load_card(p)["splits"]["train"]["fingerprint"]}
                for p, w in zip(sources[1:], weights[1:], strict=True)
            ]
    return out


def _start_wandb(r: _Run) -> None:
    cfg = r.cfg
    if cfg.wandb == "off":
        return
    if importlib.util.find_spec("wandb") is None:  # checked on every rank
        raise InputError("wandb is not installed: pip install 'ping-llm[wandb]'")
    if not r.d.master:
        return
    import wandb

    r.trainer["wandb_id"] = r.trainer.get("wandb_id") or uuid.uuid4().hex[:8]  # no RNG use
    r.wb = wandb.init(
        project=cfg.wandb_project, id=r.trainer["wandb_id"], resume="allow", mode=cfg.wandb,
        config=r.full_config, dir=str(r.run_dir) if r.run_dir is not None else None,
        name=r.run_dir.name if r.run_dir is not None else None,
    )


# ------------------------------------------------------------------------------------------------
# the step, its log line, eval, checkpoint


def training_loss(model, x: torch.Tensor, y: torch.Tensor, feats, result_weight: float = 1.0):
    """The loss a step minimises: the mean next-token cross-entropy over targets y (B, T) (-1:
    none), each Result-field target (tokens.result_targets) counted result_weight times. At 1
    this is the model's own mean, computed as before (old runs train bit-identically)."""
    if result_weight == 1:
        return model(x, y, feats=feats)[1]
    _, losses = model(x, y, feats=feats, loss_reduction="none")  # (B, T), 0 where ignored
    w = (1 + (result_weight - 1) * result_targets(x, y).to(losses.dtype)) * (y >= 0)
    return (losses * w).sum() / w.sum()


def _step(r: _Run, flag: StopFlag, t_start: float, t0: float, budget_s: float) -> dict:
    """One optimiser step: `accum` micro-batches (gradients all-reduced on the last), clipping,
    the lr of the schedule, the update. Returns the ranks' agreed loss, grad norm, share of the
    time budget spent and whether to stop (a signal, stop_at, the time limit: on any rank)."""
    cfg, d, model = r.cfg, r.d, r.model
    loss_sum = torch.zeros((), device=d.device)
    for micro in range(r.accum):
        try:
            x, y, *real = next(r.loader)  # real: the inputs under real addresses (knowledge)
        except StopIteration:
            raise RuntimeError("the training loader ran out of batches") from None
        feats = address_features(r.raw, real[0] if real else x)
        if feats is not None and cfg.knowledge_dropout:  # seeded by the global micro-batch
            from ping_llm.knowledge import drop

            g = (r.step * r.accum + micro) * d.world_size + d.rank
            feats = drop(feats, cfg.knowledge_dropout, mix_seed(cfg.seed, "kdrop", g))
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        sync = (model.no_sync() if d.world_size > 1 and micro < r.accum - 1
                else contextlib.nullcontext())
        with sync:
            with r.autocast():
                loss = training_loss(model, x, y, feats, cfg.result_loss_weight)
            (loss / r.accum).backward()
        loss_sum += loss.detach()
    params = [p for p in r.raw.parameters() if p.grad is not None]
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    # One all-reduce per step: mean loss, the (already global) grad norm, the training time after
    # this step as a fraction of the budget (0 without one), and "any rank wants to stop", so
    # that all ranks use the same lr and stop after the same step.
    want_stop = (flag.signal_name is not None
                 or (cfg.stop_at is not None and r.step + 1 >= cfg.stop_at)
                 or (cfg.time_limit_s is not None
                     and time.perf_counter() - t_start > cfg.time_limit_s))
    spent = (r.trainer["train_time_s"] + time.perf_counter() - t0) / budget_s
    stats = torch.stack([loss_sum / r.accum, grad_norm.float().to(d.device),
                         torch.tensor(spent, device=d.device),
                         torch.tensor(float(want_stop), device=d.device)])
    if d.world_size > 1:
        all_reduce(stats, d)
        stats[:3] /= d.world_size
    loss_f, norm_f, spent_f, stop_f = stats.tolist()
    if not (math.isfinite(loss_f) and math.isfinite(norm_f)):
        model.zero_grad(set_to_none=True)
        where = (f"the last good checkpoint (step {r.last_saved}) is in "
                 f"{r.run_dir / ckpt_mod.CHECKPOINT_DIR}" if r.last_saved is not None
                 and r.run_dir is not None else "no checkpoint was saved")
        raise TrainingDiverged(
            f"training diverged in step {r.step + 1}: loss {loss_f}, grad norm {norm_f} "
            f"(non-finite). Stopped without saving; {where}. Try lower learning rates, more "
            "warmup, or dtype float32.", r.step + 1, r.last_saved)
    at = min(cfg.steps, max(r.step, round(spent_f * cfg.steps)))  # where in the plan
    mult = lr_multiplier(at, cfg.steps, cfg.warmup_steps, cfg.warmdown_frac)
    for opt in r.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum(r.step)
        opt.step()
    model.zero_grad(set_to_none=True)
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    r.step += 1
    r.last_loss = loss_f
    return {"loss": loss_f, "grad_norm": norm_f, "spent": spent_f, "stop": stop_f > 0,
            "lr_mult": mult}


def _log_step(r: _Run, stats: dict, dt: float) -> None:
    cfg, mult = r.cfg, stats["lr_mult"]
    tps = r.tokens_per_step / dt
    mfu = r.flops_per_token * tps / (r.peak * r.d.world_size) if r.peak else None
    _record(r, {"kind": "train", "step": r.step, "loss": stats["loss"], "lr_mult": mult,
                "lr_matrix": cfg.matrix_lr * mult, "grad_norm": stats["grad_norm"],
                "tokens_per_s": tps, "mfu": mfu, "dt_s": dt,
                "tokens_seen": r.trainer["tokens_seen"]})
    mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    log0(r.d, f"step {r.step:6d}/{cfg.steps} | loss {stats['loss']:.4f} | lr x{mult:.3f} | "
              f"grad {stats['grad_norm']:.3f} | {tps:,.0f} tok/s | mfu {mfu_s} | "
              f"{dt * 1e3:.0f}ms")


def _record(r: _Run, rec: dict) -> None:
    """A metrics line: RUN/metrics.jsonl and wandb (rank 0)."""
    if not r.d.master:
        return
    if r.run_dir is not None:
        ckpt_mod.append_metrics(r.run_dir, rec)
    if r.wb is not None:
        r.wb.log({f"{rec['kind']}/{k}": v for k, v in rec.items()
                  if k not in ("kind", "step") and v is not None}, step=rec["step"])


def _maybe_eval(r: _Run, final: bool) -> None:
    """The held-out loss every eval_every steps and at the end."""
    cfg = r.cfg
    if not r.eval_batches or cfg.eval_every == 0 or (r.step % cfg.eval_every and not final):
        return
    t0 = time.perf_counter()
    r.last_eval, count = _evaluate(r.eval_model, r.eval_batches, r.d.device, r.autocast, r.d)
    _record(r, {"kind": "eval", "step": r.step, "eval_loss": r.last_eval, "eval_tokens": count})
    log0(r.d, f"step {r.step:6d} | eval loss {r.last_eval:.4f} ({count:,} tokens, "
              f"{time.perf_counter() - t0:.1f}s)")


def _save(r: _Run) -> None:
    """A checkpoint of this step (all ranks' loader and RNG states; rank 0 writes)."""
    if r.run_dir is None:
        return
    loader_states = all_gather(r.loader.get_state(), r.d)
    rng_states = all_gather(ckpt_mod.capture_rng_state(), r.d)
    if r.d.master:
        ckpt_mod.save_checkpoint(
            r.run_dir, model_state=r.raw.state_dict(), config=r.full_config,
            optimizers=r.optimizers, loader_states=loader_states, rng_states=rng_states,
            step=r.step, trainer=r.trainer,
        )
        if r.cfg.keep_every and r.step % r.cfg.keep_every == 0:
            ckpt_mod.keep_weights(r.run_dir, r.step)
    barrier(r.d)
    r.last_saved = r.step


def _summary(r: _Run, stopped, budget_done: bool, step_times: list, elapsed: float) -> dict:
    cfg, d = r.cfg, r.d
    measured = step_times[1:] or step_times  # the first step pays for warm-up / compile
    tps = r.tokens_per_step / statistics.median(measured) if measured else None
    return {
        "run_dir": str(r.run_dir) if r.run_dir is not None else None,
        "step": r.step,
        "start_step": r.start_step,
        "steps": cfg.steps,
        "completed": r.step >= cfg.steps or budget_done,
        "stopped": stopped,
        "final_loss": r.last_loss,
        "final_eval_loss": r.last_eval,
        "tokens_seen": r.trainer["tokens_seen"],
        "tokens_per_step": r.tokens_per_step,
        "grad_accum_steps": r.accum,
        "seq_warmup_steps": r.warmup,
        "world_size": d.world_size,
        "device": str(d.device),
        "bf16": r.use_bf16,
        "compile": cfg.compile,
        "num_params": r.raw.num_params(),
        "flops_per_token": r.flops_per_token,
        "tokens_per_s": tps,
        "mfu": r.flops_per_token * tps / (r.peak * d.world_size) if r.peak and tps else None,
        "peak_flops_per_device": r.peak,
        "elapsed_s": elapsed,
    }
