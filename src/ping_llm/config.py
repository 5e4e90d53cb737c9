"""A training run's settings: `TrainConfig`, and how a resumed or fine-tuned run gets its own.

Every `ping-llm train` option is a field here, with its default and its help; the CLI builds
its flags from these fields. Kept apart from `ping_llm.train` (and free of torch) so that
`ping-llm --help` stays instant. `config_for_run` is the CLI's rule for --resume and
--init-from: a resumed run keeps its checkpoint's settings unless given again, a child run its
parent's model shape.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ping_llm.errors import InputError


@dataclass
class TrainConfig:
    """Everything `ping-llm train` takes. Defaults train the tiny preset on CPU in minutes.

    Batch: each rank runs micro-batches of device_batch_size x sequence_len tokens;
    total_batch_tokens (None = one micro-batch per rank) sets the tokens per optimiser step,
    and grad_accum_steps = total_batch_tokens / (device_batch_size x sequence_len x world_size)
    must come out a positive integer.
    """

    data_dir: str | None = None  # prepared dataset (has card.json); None when loaders are given
    # More prepared datasets to train on together with data_dir (whose val is the held-out set),
    # and the mixture's weights for [data_dir, *extra_data] (None: by train measurements).
    extra_data: list = field(default_factory=list)
    mix: list | None = None
    out_dir: str | None = None  # run directory; None writes nothing (benchmarks)
    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # GPTConfig overrides, e.g. {"n_layer": 2}
    steps: int = 1000  # optimiser steps in the whole run (the LR schedule spans these)
    device_batch_size: int = 8
    total_batch_tokens: int | None = None
    matrix_lr: float = 0.02  # Muon, hidden matrices
    embedding_lr: float = 0.2  # AdamW, scaled by (n_embd/768)^-0.5 in optim.build_optimizers
    unembedding_lr: float = 0.004
    memory_lr: float = 0.2  # AdamW, the prefix-memory table (scaled like embedding_lr)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmdown_frac: float = 0.2  # last fraction of steps: linear decay to 0
    # Sequence-length warmup (loader.CurriculumLoader, docs/results.md): the first
    # seq_warmup_frac of the steps train on contexts of seq_warmup_len tokens (same tokens per
    # batch), then full-length ones. Off when the model's context is not longer; loaders passed
    # to train() are used as they are.
    seq_warmup_frac: float = 0.5
    seq_warmup_len: int = 256
    # Identity augmentation (loader.readdress): the fraction of training contexts whose source
    # (destinations) get new addresses, so the model must read the context to predict them.
    # 0.25 chosen on val (docs/results.md): most of 0.5's gain on re-addressed (cold) val, none
    # of its loss on known sources without context.
    readdress_src: float = 0.25
    readdress_dst: float = 0.0
    # What the model knows about addresses beyond their bytes (docs/results.md, "Address
    # knowledge"): prefix_buckets rows per level of the hashed prefix memory (model.prefix_slots;
    # 0 = none), and knowledge = features of every address from a MaxMind database (geo_db; None
    # = the packaged GeoLite2-City), recorded in the run and required again by every query.
    prefix_buckets: int = 0
    knowledge: bool = False
    geo_db: str | None = None
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (norm still logged)
    eval_every: int = 100  # steps; 0 = never (except none at all)
    eval_batches: int = 8  # global micro-batches in the fixed held-out set
    eval_split: str = "val"  # the split for choosing; test splits are for reporting only
    save_every: int = 250  # steps; 0 = only at the end and on SIGINT/SIGTERM
    log_every: int = 10
    seed: int = 0
    compile: bool = False
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N | mps ...
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | bfloat16 | float32
    wandb: str = "off"  # off | online | offline
    wandb_project: str = "ping-llm"
    peak_flops: float | None = None  # per device, for MFU; None = PEAK_BF16_FLOPS / null on CPU
    time_limit_s: float | None = None  # stop cleanly (checkpoint) before this wall time
    # Follow the schedule by training time: the lr decays over the last warmdown_frac of this
    # many seconds of steps, and the run is complete when they are spent (`steps` is then an upper
    # bound). For a machine whose speed is not known in advance; not bit-reproducible.
    time_budget_s: float | None = None
    stop_at: int | None = None  # stop cleanly (checkpoint) after this global step, as if preempted
    # A new run that starts from another run's weights (fine-tuning, a later campaign); its
    # lineage is recorded and eval's leak check follows it. init_optimizer also takes the
    # parent's optimizer moments (its learning rates and schedule are this run's own).
    init_from: str | None = None
    init_optimizer: bool = False
    keep_every: int = 0  # also keep the weights of every N-th step (RUN/kept/): learning curves
    resume: bool = False  # continue from out_dir's checkpoint if there is one

    def __post_init__(self):
        def positive_int(name, allow_zero=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                need = "a non-negative" if allow_zero else "a positive"
                raise InputError(f"{name} must be {need} integer, got {v!r}")

        for name in ("steps", "device_batch_size", "log_every", "eval_batches"):
            positive_int(name)
        for name in ("warmup_steps", "eval_every", "save_every", "seed", "prefix_buckets",
                     "keep_every"):
            positive_int(name, allow_zero=True)
        if self.total_batch_tokens is not None:
            positive_int("total_batch_tokens")
        if self.stop_at is not None:
            positive_int("stop_at")
        for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "memory_lr", "weight_decay",
                     "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise InputError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.seq_warmup_frac, int | float) and 0 <= self.seq_warmup_frac < 1):
            raise InputError(f"seq_warmup_frac must be in [0, 1), got {self.seq_warmup_frac!r}")
        positive_int("seq_warmup_len")
        for name in ("readdress_src", "readdress_dst"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
                raise InputError(f"{name} must be a fraction in [0, 1], got {v!r}")
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise InputError(f"warmdown_frac must be in [0, 1], got {self.warmdown_frac}")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise InputError(f"dtype must be auto, bfloat16 or float32, got {self.dtype!r}")
        if self.wandb not in ("off", "online", "offline"):
            raise InputError(f"wandb must be off, online or offline, got {self.wandb!r}")
        if not isinstance(self.knowledge, bool):
            raise InputError(f"knowledge must be true or false, got {self.knowledge!r}")
        if self.preset not in ("tiny", "small", "full"):
            raise InputError(f"preset must be tiny, small or full, got {self.preset!r}")
        if not isinstance(self.model, dict):
            raise InputError(f"model overrides must be a dict, got {type(self.model).__name__}")
        for name in ("peak_flops", "time_limit_s", "time_budget_s"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int | float) or not v > 0):
                raise InputError(f"{name} must be a positive number or None, got {v!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**d)

    def gpt_config(self):
        from ping_llm import knowledge
        from ping_llm.model import GPTConfig

        extra = {"prefix_buckets": self.prefix_buckets}
        if self.knowledge:
            extra.update(knowledge_dim=knowledge.DENSE_DIM,
                         knowledge_vocab=knowledge.KNOWLEDGE_VOCAB)
        try:
            return GPTConfig.preset(self.preset, **{**extra, **self.model})
        except TypeError as e:
            raise InputError(f"bad model override {self.model}: {e}") from None


# Fields that must not change when resuming: they fix the weights' shapes or the data order.
RESUME_FIXED = ("preset", "model", "device_batch_size", "seed", "seq_warmup_frac",
                "seq_warmup_len", "prefix_buckets", "knowledge", "extra_data")
# What runs recorded before a field existed trained with (so they resume as they were).
LEGACY_DEFAULTS = {"seq_warmup_frac": 0.0, "seq_warmup_len": 256, "readdress_src": 0.0,
                   "readdress_dst": 0.0, "prefix_buckets": 0, "knowledge": False, "geo_db": None,
                   "memory_lr": 0.2, "extra_data": [], "mix": None}


def config_for_run(out_dir, resume: bool, **overrides) -> TrainConfig:
    """The CLI's config: with --resume and an existing checkpoint, the checkpoint's own config
    plus the options given now; else the defaults plus the options given now."""
    from ping_llm.checkpoint import find_checkpoint, read_config

    base: dict = {}
    ckpt = find_checkpoint(out_dir) if resume else None
    given = {k: v for k, v in overrides.items() if v is not None}
    if ckpt is not None:
        base = {**LEGACY_DEFAULTS, **read_config(ckpt)["train"]}
        base = {k: v for k, v in base.items() if k not in ("stop_at", "time_limit_s")}
    elif given.get("init_from"):  # a child has its parent's shape unless told otherwise
        parent = {**LEGACY_DEFAULTS, **read_config(given["init_from"])["train"]}
        base = {k: parent[k] for k in ("preset", "model", "prefix_buckets", "knowledge",
                                        "geo_db") if k in parent}
    if "model" in given:  # --model KEY=VALUE changes one field of the model, not all of them
        given["model"] = {**base.get("model", {}), **given["model"]}
    base.update(given)
    base.update(out_dir=str(out_dir), resume=resume)
    return TrainConfig.from_dict(base)


# ------------------------------------------------------------------------------------------------
# what the settings imply for a run


def grad_accum_steps(cfg: TrainConfig, seq_len: int, world_size: int) -> int:
    per_step = cfg.device_batch_size * seq_len * world_size
    total = cfg.total_batch_tokens or per_step
    if total % per_step:
        raise InputError(
            f"total_batch_tokens {total} is not a multiple of device_batch_size x sequence_len x "
            f"world_size = {cfg.device_batch_size} x {seq_len} x {world_size} = {per_step}"
        )
    return total // per_step


def seq_warmup_steps(cfg: TrainConfig, seq_len: int) -> int:
    """Optimiser steps on short contexts: 0 when off or when the model's context is not longer."""
    if cfg.seq_warmup_frac == 0 or cfg.seq_warmup_len >= seq_len:
        return 0
    if seq_len % cfg.seq_warmup_len:
        raise InputError(f"seq_warmup_len {cfg.seq_warmup_len} must divide the model's "
                         f"sequence_len {seq_len} (or turn the warmup off: seq_warmup_frac 0)")
    return round(cfg.seq_warmup_frac * cfg.steps)


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


def planned_warmup(ckpt, seq_len: int) -> int:
    """The sequence-length warmup a checkpointed run planned when it started. Extending a run
    (resuming with more steps) re-plans the lr schedule for the new total but not the warmup:
    its switch may already lie behind, and the loader's state was written for that plan."""
    recorded = ckpt.meta.get("trainer", {}).get("seq_warmup_steps")
    if recorded is not None:
        return int(recorded)
    first = TrainConfig.from_dict({**LEGACY_DEFAULTS, **ckpt.config["train"]})
    return seq_warmup_steps(first, seq_len)  # older runs: their own config's plan
