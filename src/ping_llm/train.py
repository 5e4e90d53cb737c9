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

Loader contract (the real one is `ping_llm.data.loader.build_loader`; `SyntheticLoader` below is the
reference implementation used by tests and benchmarks)::

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
import hashlib
import importlib.util
import math
import statistics
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from ping_llm.config import LEGACY_DEFAULTS, RESUME_FIXED, TrainConfig
from ping_llm.errors import InputError
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

# ------------------------------------------------------------------------------------------------
# the reference loader


def _mix_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class SyntheticLoader:
    """Seeded, structured synthetic token stream that follows the loader contract above.

    A sparse Markov chain over the vocabulary: token a is followed by one of `branching`
    successors with fixed probabilities (drawn from `seed`, shared by every split), so a model
    can learn far below the unigram entropy (~5.4 nats) towards the conditional one (~1.1 nats
    for branching 4). Global micro-batch g of (seed, split) is generated from its own generator
    seeded by (seed, split, g); rank r of W yields g = r, r + W, ... Each row's last
    0..T/8 targets are -1, exercising the ignore-index path like real unused positions.
    """

    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int = 267,
        branching: int = 4,
    ):
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} out of range for world_size {world_size}")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.split, self.rank, self.world_size = seed, split, rank, world_size
        g = torch.Generator().manual_seed(_mix_seed("table", seed))
        self.successors = torch.stack(
            [torch.randperm(vocab_size, generator=g)[:branching] for _ in range(vocab_size)]
        )  # (V, K)
        logits = torch.randn(vocab_size, branching, generator=g) * 1.5
        self.cum = torch.softmax(logits, -1).cumsum(-1)  # (V, K) cumulative successor probs
        self.vocab_size = vocab_size
        self.next_local = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.next_local * self.world_size + self.rank
        self.next_local += 1
        return self.batch(g)

    def batch(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global micro-batch g: (inputs, targets), int64 (B, T)."""
        B, T = self.batch_size, self.seq_len
        gen = torch.Generator().manual_seed(_mix_seed(self.seed, self.split, g))
        tok = torch.randint(self.vocab_size, (B,), generator=gen)
        u = torch.rand(B, T, generator=gen)
        seq = torch.empty(B, T + 1, dtype=torch.int64)
        seq[:, 0] = tok
        for t in range(T):
            k = (self.cum[tok] < u[:, t : t + 1]).sum(1).clamp_(max=self.cum.size(1) - 1)
            tok = self.successors[tok, k]
            seq[:, t + 1] = tok
        inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
        pad = torch.randint(0, max(T // 8, 1), (B,), generator=gen)
        targets[torch.arange(T)[None, :] >= (T - pad)[:, None]] = -1
        return inputs, targets

    def get_state(self) -> dict:
        return {"kind": "synthetic", "seed": self.seed, "split": self.split,
                "next_local": self.next_local}

    def set_state(self, state: dict) -> None:
        if (state.get("kind"), state.get("seed"), state.get("split")) != (
            "synthetic", self.seed, self.split
        ):
            raise InputError(f"loader state {state} does not belong to this synthetic loader")
        self.next_local = int(state["next_local"])


# ------------------------------------------------------------------------------------------------
# errors


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is left as it was."""

    def __init__(self, message: str, step: int, checkpoint_step: int | None):
        super().__init__(message)
        self.step, self.checkpoint_step = step, checkpoint_step


# ------------------------------------------------------------------------------------------------
# the loop


def grad_accum_steps(cfg: TrainConfig, seq_len: int, world_size: int) -> int:
    per_step = cfg.device_batch_size * seq_len * world_size
    total = cfg.total_batch_tokens or per_step
    if total % per_step:
        raise InputError(
            f"total_batch_tokens {total} is not a multiple of device_batch_size x sequence_len x "
            f"world_size = {cfg.device_batch_size} x {seq_len} x {world_size} = {per_step}"
        )
    return total // per_step


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
                                readdress_dst=cfg.readdress_dst)
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


def seq_warmup_steps(cfg: TrainConfig, seq_len: int) -> int:
    """Optimiser steps on short contexts: 0 when off or when the model's context is not longer."""
    if cfg.seq_warmup_frac == 0 or cfg.seq_warmup_len >= seq_len:
        return 0
    if seq_len % cfg.seq_warmup_len:
        raise InputError(f"seq_warmup_len {cfg.seq_warmup_len} must divide the model's "
                         f"sequence_len {seq_len} (or turn the warmup off: seq_warmup_frac 0)")
    return round(cfg.seq_warmup_frac * cfg.steps)


def _init_from_parent(cfg: TrainConfig, raw, optimizers, gpt_config, d: Dist) -> list[dict]:
    """--init-from: the parent run's weights (and, with init_optimizer, its optimizer moments)
    into this new run. Returns the lineage: the parent's entry, then the parent's own lineage."""
    from ping_llm import checkpoint as ckpt_mod
    from ping_llm.model import GPTConfig

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


def mixture(cfg: TrainConfig) -> tuple[list[Path], list[float]]:
    """The datasets a run trains on ([data_dir, *extra_data]) and their weights: `mix` as
    given, else each one's share of the train measurements (what concatenating them gives)."""
    from ping_llm.data.prepare import load_card

    sources = [Path(cfg.data_dir), *map(Path, cfg.extra_data)]
    if cfg.mix is not None:
        if len(cfg.mix) != len(sources):
            raise InputError(f"--mix has {len(cfg.mix)} weights for {len(sources)} datasets")
        return sources, [float(w) for w in cfg.mix]
    return sources, [float(load_card(p)["splits"]["train"]["measurements"]) for p in sources]


def _planned_warmup(ckpt, seq_len: int) -> int:
    """The sequence-length warmup a checkpointed run planned when it started. Extending a run
    (resuming with more steps) re-plans the lr schedule for the new total but not the warmup:
    its switch may already lie behind, and the loader's state was written for that plan."""
    recorded = ckpt.meta.get("trainer", {}).get("seq_warmup_steps")
    if recorded is not None:
        return int(recorded)
    first = TrainConfig.from_dict({**LEGACY_DEFAULTS, **ckpt.config["train"]})
    return seq_warmup_steps(first, seq_len)  # older runs: their own config's plan


def _eval_set(eval_loader, cfg: TrainConfig, d: Dist) -> list:
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


def train(config: TrainConfig, *, loader=None, eval_loader=None) -> dict:
    """Train (or resume) a run; returns a summary dict (also printed by `ping-llm train --json`).

    loader / eval_loader: objects following the loader contract (module docstring), already
    sharded for this process's rank; when None they are built from config.data_dir.
    Raises InputError for bad config/data, TrainingDiverged on NaN/inf loss.
    """
    from ping_llm import checkpoint as ckpt_mod
    from ping_llm.model import GPT
    from ping_llm.optim import Muon, build_optimizers, lr_multiplier, muon_momentum

    cfg = config
    d = setup(cfg.device)
    wb = lock = None
    try:
        gpt_config = cfg.gpt_config()
        T = gpt_config.sequence_len
        accum = grad_accum_steps(cfg, T, d.world_size)
        if cfg.dtype == "bfloat16" and d.device.type != "cuda":
            raise InputError("bf16 autocast is for CUDA only; use dtype auto or float32 on CPU")
        use_bf16 = d.device.type == "cuda" and cfg.dtype in ("auto", "bfloat16")
        if d.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls that remain (NS on fp32)
            torch.backends.cudnn.allow_tf32 = True

        def autocast():
            if use_bf16:
                return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
            return contextlib.nullcontext()

        run_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
        if run_dir is not None and d.master:
            lock = ckpt_mod.RunLock(run_dir)
            lock.acquire()
        ckpt = None
        if run_dir is not None:
            found = ckpt_mod.find_checkpoint(run_dir)
            if found is not None and not cfg.resume:
                step = ckpt_mod.read_meta(found)["step"]
                raise InputError(
                    f"{run_dir} already holds a checkpoint (step {step}); pass --resume to "
                    "continue it or choose another --out"
                )
            if found is not None:
                ckpt = ckpt_mod.load_checkpoint(found)
                _check_resume(ckpt, cfg, d)
            elif cfg.resume:
                log0(d, f"resume: no checkpoint in {run_dir}, starting a new run")

        warmup = 0
        if loader is None:
            warmup = seq_warmup_steps(cfg, T)
            if ckpt is not None:  # extended (more --steps): the warmup keeps its first plan
                warmup = _planned_warmup(ckpt, T)
            loader, eval_loader = _build_data_loaders(cfg, T, accum, warmup, d)

        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.seed)
        model = GPT(gpt_config).to(d.device)
        raw = model
        if gpt_config.knowledge_dim:
            from ping_llm.knowledge import AddressKnowledge

            raw.knowledge = AddressKnowledge.open(cfg.geo_db)
        optimizers = build_optimizers(
            raw,
            matrix_lr=cfg.matrix_lr,
            embedding_lr=cfg.embedding_lr,
            unembedding_lr=cfg.unembedding_lr,
            memory_lr=cfg.memory_lr,
            weight_decay=cfg.weight_decay,
        )
        start_step, trainer = 0, {"tokens_seen": 0, "train_time_s": 0.0, "wandb_id": None,
                                  "seq_warmup_steps": warmup}
        if ckpt is not None:
            if raw.knowledge is not None:
                ckpt_mod.check_knowledge(ckpt.config, raw.knowledge)
            raw.load_state_dict({k: v.to(d.device) for k, v in ckpt.model_state.items()})
            ckpt.load_optimizers(optimizers)
            loader.set_state(ckpt.loader_states[d.rank])
            ckpt_mod.restore_rng_state(ckpt.rng_states[d.rank])
            start_step = ckpt.step
            trainer.update(ckpt.meta.get("trainer", {}))
            log0(d, f"resumed from {ckpt.path} at step {start_step}")
        else:
            torch.manual_seed(_mix_seed(cfg.seed, "rank", d.rank))
        if ckpt is not None:
            lineage = ckpt.config.get("lineage", [])
        elif cfg.init_from is not None:
            lineage = _init_from_parent(cfg, raw, optimizers, gpt_config, d)
        else:
            lineage = []
        del ckpt  # the CPU copies of weights and optimizer state

        if cfg.compile:
            model = torch.compile(model)
        eval_model = model
        if d.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

        full_config = {"model": gpt_config.to_dict(), "train": cfg.to_dict()}
        if lineage:  # the runs whose weights this one started from, nearest first
            full_config["lineage"] = lineage
        if raw.knowledge is not None:  # which database: queries must open the same one
            full_config["knowledge"] = raw.knowledge.describe()
        if cfg.data_dir is not None:  # what `eval` checks against to refuse leaky comparisons
            from ping_llm.data.prepare import load_card

            card = load_card(cfg.data_dir)
            full_config["dataset"] = {
                "train_fingerprint": card["splits"]["train"]["fingerprint"],
                "split_fingerprints": {k: v.get("fingerprint") for k, v in card["splits"].items()},
            }
            if cfg.extra_data:  # the other datasets of the mixture: eval checks them too
                sources, weights = mixture(cfg)
                full_config["mixture"] = [
                    {"data_dir": str(p), "weight": w,
                     "fingerprint": load_card(p)["splits"]["train"]["fingerprint"]}
                    for p, w in zip(sources[1:], weights[1:], strict=True)
                ]
        if run_dir is not None and d.master:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt_mod.write_json_atomic(run_dir / ckpt_mod.CONFIG_FILE, full_config)
            ckpt_mod.truncate_metrics(run_dir, start_step)

        n_params = raw.num_params()
        flops_per_token = raw.estimate_flops_per_token()
        peak = cfg.peak_flops or peak_flops_for(d.device)
        tokens_per_step = accum * cfg.device_batch_size * T * d.world_size
        log0(d, f"model {cfg.preset} {gpt_config.to_dict()} | {n_params:,} params | "
                f"{flops_per_token / 1e6:.1f} MFLOP/token")
        log0(d, f"device {d.device} x{d.world_size} | bf16 {use_bf16} | compile {cfg.compile} | "
                f"batch {cfg.device_batch_size}x{T} x accum {accum} x world {d.world_size} = "
                f"{tokens_per_step:,} tokens/step | steps {start_step}->{cfg.steps}")
        if peak is None:
            log0(d, f"MFU: no peak FLOP/s known for {d.device}; pass peak_flops to get one")

        if cfg.wandb != "off" and importlib.util.find_spec("wandb") is None:  # on every rank
            raise InputError("wandb is not installed: pip install 'ping-llm[wandb]'")
        if cfg.wandb != "off" and d.master:
            import wandb

            trainer["wandb_id"] = trainer.get("wandb_id") or uuid.uuid4().hex[:8]  # no RNG use
            wb = wandb.init(
                project=cfg.wandb_project, id=trainer["wandb_id"], resume="allow",
                mode=cfg.wandb, config=full_config,
                dir=str(run_dir) if run_dir is not None else None,
                name=run_dir.name if run_dir is not None else None,
            )

        eval_batches = _eval_set(eval_loader, cfg, d) if eval_loader is not None else []
        eval_loader = None  # read once and cached: release its pipeline

        def record(rec: dict) -> None:
            if not d.master:
                return
            if run_dir is not None:
                ckpt_mod.append_metrics(run_dir, rec)
            if wb is not None:
                wb.log({f"{rec['kind']}/{k}": v for k, v in rec.items()
                        if k not in ("kind", "step") and v is not None}, step=rec["step"])

        last_saved = start_step if start_step > 0 else None

        def save(step: int) -> None:
            nonlocal last_saved
            if run_dir is None:
                return
            loader_states = all_gather(loader.get_state(), d)
            rng_states = all_gather(ckpt_mod.capture_rng_state(), d)
            if d.master:
                ckpt_mod.save_checkpoint(
                    run_dir, model_state=raw.state_dict(), config=full_config,
                    optimizers=optimizers, loader_states=loader_states, rng_states=rng_states,
                    step=step, trainer=trainer,
                )
                if cfg.keep_every and step % cfg.keep_every == 0:
                    ckpt_mod.keep_weights(run_dir, step)
            barrier(d)
            last_saved = step

        last_eval = None

        def maybe_eval(step: int, final: bool = False) -> None:
            nonlocal last_eval
            if not eval_batches or cfg.eval_every == 0:
                return
            if step % cfg.eval_every and not final:
                return
            t0 = time.perf_counter()
            last_eval, count = _evaluate(eval_model, eval_batches, d.device, autocast, d)
            record({"kind": "eval", "step": step, "eval_loss": last_eval, "eval_tokens": count})
            log0(d, f"step {step:6d} | eval loss {last_eval:.4f} ({count:,} tokens, "
                    f"{time.perf_counter() - t0:.1f}s)")

        model.train()
        if start_step == 0:
            maybe_eval(0)
        step, stopped, last_loss = start_step, None, None
        step_times, t_start = [], time.perf_counter()
        budget_s = cfg.time_budget_s or math.inf
        budget_done = trainer["train_time_s"] >= budget_s  # a resumed run that already ended

        with StopFlag() as flag:
            progress = progress_bar(d, cfg.steps, start_step)
            while step < cfg.steps and not budget_done:
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=d.device)
                for micro in range(accum):
                    try:
                        x, y = next(loader)
                    except StopIteration:
                        raise RuntimeError("the training loader ran out of batches") from None
                    feats = address_features(raw, x)
                    x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                    sync = (model.no_sync() if d.world_size > 1 and micro < accum - 1
                            else contextlib.nullcontext())
                    with sync:
                        with autocast():
                            _, loss = model(x, y, feats=feats)
                        (loss / accum).backward()
                    loss_sum += loss.detach()
                params = [p for p in raw.parameters() if p.grad is not None]
                if cfg.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                else:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                # One all-reduce per step: mean loss, the (already global) grad norm, and "any
                # rank wants to stop", so that all ranks stop after the same step.
                want_stop = (
                    flag.signal_name is not None
                    or (cfg.stop_at is not None and step + 1 >= cfg.stop_at)
                    or (cfg.time_limit_s is not None
                        and time.perf_counter() - t_start > cfg.time_limit_s)
                )
                # Training time after this step, as a fraction of the budget (0 without one);
                # averaged over the ranks so that all of them use the same lr and stop together.
                spent = (trainer["train_time_s"] + time.perf_counter() - t0) / budget_s
                stats = torch.stack([loss_sum / accum, grad_norm.float().to(d.device),
                                     torch.tensor(spent, device=d.device),
                                     torch.tensor(float(want_stop), device=d.device)])
                if d.world_size > 1:
                    all_reduce(stats, d)
                    stats[:3] /= d.world_size
                loss_f, norm_f, spent_f, stop_f = stats.tolist()
                if not (math.isfinite(loss_f) and math.isfinite(norm_f)):
                    model.zero_grad(set_to_none=True)
                    where = (f"the last good checkpoint (step {last_saved}) is in "
                             f"{run_dir / ckpt_mod.CHECKPOINT_DIR}" if last_saved is not None
                             and run_dir is not None else "no checkpoint was saved")
                    raise TrainingDiverged(
                        f"training diverged in step {step + 1}: loss {loss_f}, grad norm "
                        f"{norm_f} (non-finite). Stopped without saving; {where}. Try lower "
                        "learning rates, more warmup, or dtype float32.",
                        step + 1, last_saved,
                    )
                at = min(cfg.steps, max(step, round(spent_f * cfg.steps)))  # where in the plan
                mult = lr_multiplier(at, cfg.steps, cfg.warmup_steps, cfg.warmdown_frac)
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["lr"] = group["initial_lr"] * mult
                        if isinstance(opt, Muon):
                            group["momentum"] = muon_momentum(step)
                    opt.step()
                model.zero_grad(set_to_none=True)
                if d.device.type == "cuda":
                    torch.cuda.synchronize(d.device)
                dt = time.perf_counter() - t0
                step += 1
                last_loss = loss_f
                trainer["tokens_seen"] += tokens_per_step
                trainer["train_time_s"] += dt
                budget_done = spent_f >= 1.0  # the ranks' agreed value, not each one's clock
                if budget_done:  # recorded, so that a resumed run knows it is complete
                    trainer["train_time_s"] = max(trainer["train_time_s"], cfg.time_budget_s)
                step_times.append(dt)
                progress.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps or stop_f > 0 or spent_f >= 1:
                    tps = tokens_per_step / dt
                    mfu = flops_per_token * tps / (peak * d.world_size) if peak else None
                    record({"kind": "train", "step": step, "loss": loss_f, "lr_mult": mult,
                            "lr_matrix": cfg.matrix_lr * mult, "grad_norm": norm_f,
                            "tokens_per_s": tps, "mfu": mfu, "dt_s": dt,
                            "tokens_seen": trainer["tokens_seen"]})
                    mfu_s = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
                    log0(d, f"step {step:6d}/{cfg.steps} | loss {loss_f:.4f} | lr x{mult:.3f} | "
                            f"grad {norm_f:.3f} | {tps:,.0f} tok/s | mfu {mfu_s} | "
                            f"{dt * 1e3:.0f}ms")
                done = step == cfg.steps or budget_done
                maybe_eval(step, final=done)
                if stop_f > 0 and not done:
                    stopped = (flag.signal_name if flag.signal_name is not None
                               else "stop_at" if cfg.stop_at is not None and step >= cfg.stop_at
                               else "time_limit")
                keep = cfg.keep_every and step % cfg.keep_every == 0
                if done or stopped or keep or (cfg.save_every and step % cfg.save_every == 0):
                    save(step)
                if stopped:
                    log0(d, f"stopped ({stopped}) after step {step}; checkpoint saved in "
                            f"{run_dir}; continue with --resume")
                    break
            progress.close()

        measured = step_times[1:] or step_times  # the first step pays for warm-up / compile
        tps = tokens_per_step / statistics.median(measured) if measured else None
        summary = {
            "run_dir": str(run_dir) if run_dir is not None else None,
            "step": step,
            "start_step": start_step,
            "steps": cfg.steps,
            "completed": step >= cfg.steps or budget_done,
            "stopped": stopped,
            "final_loss": last_loss,
            "final_eval_loss": last_eval,
            "tokens_seen": trainer["tokens_seen"],
            "tokens_per_step": tokens_per_step,
            "grad_accum_steps": accum,
            "seq_warmup_steps": warmup,
            "world_size": d.world_size,
            "device": str(d.device),
            "bf16": use_bf16,
            "compile": cfg.compile,
            "num_params": n_params,
            "flops_per_token": flops_per_token,
            "tokens_per_s": tps,
            "mfu": flops_per_token * tps / (peak * d.world_size) if peak and tps else None,
            "peak_flops_per_device": peak,
            "elapsed_s": time.perf_counter() - t_start,
        }
        if d.owns_group:
            barrier(d)  # nobody tears down the group while a peer still talks (gloo aborts)
        return summary
    finally:
        if wb is not None:
            wb.finish()
        if lock is not None:
            lock.release()
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()
