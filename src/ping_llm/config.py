"""A training run's settings: `TrainConfig`, and how a resumed or fine-tuned run gets its own.

Every `ping-llm train` option is a field here, with its default and its help; the CLI builds
its flags from these fields. Kept apart from `ping_llm.train` (and free of torch) so that
`ping-llm --help` stays quick. `config_for_run` is the CLI's rule for --resume and
--init-from: a resumed run keeps its checkpoint's settings unless given again, a child run its
parent's model shape.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ping_llm.errors import InputError
from ping_llm.options import option

PRESETS = ("tiny", "small", "full")  # model sizes (model.GPTConfig.preset)
DTYPES = ("auto", "bfloat16", "float32")
WANDB_MODES = ("off", "online", "offline")


@dataclass
class TrainConfig:
    """Everything `ping-llm train` takes. Defaults train the tiny preset on CPU in minutes.

    Batch: each rank runs micro-batches of device_batch_size x sequence_len tokens;
    total_batch_tokens (None = one micro-batch per rank) sets the tokens per optimiser step,
    and grad_accum_steps = total_batch_tokens / (device_batch_size x sequence_len x world_size)
    must come out a positive integer.

    The fields made with `option` are `ping-llm train` flags, their help the field's doc. The CLI
    spells the flags for the others itself, as none is one value of one field (--data for
    data_dir and extra_data, --mix, --model, --out, --resume); stop_at is for tests only.
    """

    data_dir: str | None = None  # prepared dataset (has card.json); None when loaders are given
    # More prepared datasets to train on together with data_dir (whose val is the held-out set),
    # and the mixture's weights for [data_dir, *extra_data] (None: by train measurements).
    extra_data: list = field(default_factory=list)
    mix: list | None = None
    out_dir: str | None = None  # run directory; None writes nothing (benchmarks)
    preset: str = option("tiny", "model size", choices=PRESETS)
    model: dict = field(default_factory=dict)  # GPTConfig overrides, e.g. {"n_layer": 2}
    steps: int = option(1000, "optimiser steps of the whole run, which the lr schedule spans")
    device_batch_size: int = option(8, "sequences per device per micro-step", flag="--batch-size")
    total_batch_tokens: int | None = option(
        None, "tokens per optimiser step over all devices; sets gradient accumulation (default: "
        "one micro-batch per device)")
    matrix_lr: float = option(0.02, "Muon lr for hidden matrices")
    # The embedding's lr is scaled by (n_embd/768)^-0.5 in optim.build_optimizers, the prefix
    # memory's likewise.
    embedding_lr: float = option(0.2, "AdamW lr for the embedding")
    unembedding_lr: float = option(0.004, "AdamW lr for lm_head")
    memory_lr: float = option(0.2, "AdamW lr for the prefix-memory table")
    weight_decay: float = option(0.0, "decoupled weight decay")
    warmup_steps: int = option(0, "linear lr warmup steps")
    warmdown_frac: float = option(0.2, "last fraction of steps: linear lr decay to 0")
    # Sequence-length warmup (data.loader.CurriculumLoader, docs/results.md), with the same
    # tokens per batch. Off when the model's context is not longer; loaders passed to train()
    # are used as they are.
    seq_warmup_frac: float = option(0.5, "first fraction of steps on short contexts, then full "
                                    "length; 0 = off", metavar="FRAC")
    seq_warmup_len: int = option(256, "length of those short contexts; divides sequence_len",
                                 metavar="TOKENS")
    # Identity augmentation (data.contexts.readdress). 0.25 chosen on val (docs/results.md): most of
    # 0.5's gain on re-addressed (cold) val, none of its loss on known sources without context.
    readdress_src: float = option(0.25, "fraction of training contexts whose source gets new "
                                  "addresses, so the model learns to read its context",
                                  metavar="FRAC")
    readdress_dst: float = option(0.0, "likewise for the destinations of a context",
                                  metavar="FRAC")
    # What the model knows about addresses beyond their bytes (docs/results.md, "Address
    # knowledge"): the hashed prefix memory (model.prefix_slots) and the database's features,
    # which the run records and every query then requires. Knowledge with readdress_knowledge
    # chosen on val and val_probe (session 11): better on both, median and CRPS, at every k;
    # knowledge alone lost there (a re-addressed source's database location is then random).
    prefix_buckets: int = option(0, "prefix memory: hashed embedding rows per prefix level (/8 "
                                 "/16 /24 /32, IPv6 /16../64); 0 = none")
    knowledge: bool = option(True, "feed the model each address's location, country and ASN "
                             "from a MaxMind database")
    geo_db: str | None = option(None, "that database (default: the packaged GeoLite2-City of "
                                "2019-12-24)", metavar="FILE")
    readdress_knowledge: bool = option(True, "with knowledge: a re-addressed source or "
                                       "destination keeps its real address's knowledge")
    # Knowledge dropout (knowledge.drop): a context read as if the database placed none of its
    # addresses, so that known addresses are memorised beside the database's coarse location of
    # them. 0.5 lost on val and val_probe (session 13): off.
    knowledge_dropout: float = option(0.0, "with knowledge: fraction of training contexts read "
                                      "without it", metavar="FRAC")
    # The training loss's weight on the result tokens (RTT_START or FAILED and the two RTT bytes,
    # tokens.result_targets) relative to every other token, whose loss is mostly the address
    # bytes: how much of a small model's budget goes to the latency the queries ask for.
    result_loss_weight: float = option(1.0, "training-loss weight of the result tokens (RTT "
                                       "and failure) against the other tokens'", metavar="W")
    grad_clip: float = option(1.0, "max global gradient norm; 0 = no clipping, the norm still "
                              "logged")
    eval_every: int = option(100, "steps between held-out evals (and one at the end); 0 = none "
                             "at all")
    eval_batches: int = option(8, "global micro-batches in the fixed held-out set")
    eval_split: str = option("val", "held-out split of the dataset, for choosing; test splits "
                             "are for reporting only")
    save_every: int = option(250, "steps between checkpoints; 0 = only at the end and on "
                             "SIGINT/SIGTERM")
    log_every: int = option(10, "steps between log lines")
    seed: int = option(0, "seed of init and data order")
    compile: bool = option(False, "torch.compile the model")
    device: str = option("auto", "auto (cuda if available) | cpu | cuda | cuda:N | mps ...")
    dtype: str = option("auto", "auto = bf16 autocast on CUDA, fp32 elsewhere",
                        choices=DTYPES)
    wandb: str = option("off", "log to wandb", choices=WANDB_MODES)
    wandb_project: str = option("ping-llm", "wandb project")
    peak_flops: float | None = option(None, "peak FLOP/s per device, for MFU (default: looked "
                                      "up for common data-centre GPUs; none on CPU)")
    time_limit_s: float | None = option(None, "stop cleanly with a checkpoint after this much "
                                        "training time", flag="--time-limit", unit="minutes")
    # Following the schedule by training time is for a machine whose speed is not known in
    # advance; it is not bit-reproducible.
    time_budget_s: float | None = option(
        None, "finish the schedule in this much training time: the lr decays over its last "
        "--warmdown-frac and the run ends complete (--steps becomes an upper bound)",
        flag="--time-budget", unit="minutes")
    stop_at: int | None = None  # stop cleanly (checkpoint) after this global step, as if preempted
    # A run that starts from another run's weights: a fine-tune, a later campaign.
    init_from: str | None = option(None, "start a new run from another run's weights (fine-tune "
                                   "on --data); the lineage is recorded and eval's leak check "
                                   "follows it", metavar="PARENT_RUN")
    init_optimizer: bool = option(False, "with --init-from: also take the parent's optimizer "
                                  "moments; the learning rates and schedule stay this run's own",
                                  action="store_true")
    keep_every: int = option(0, "also keep the weights of every N-th step in RUN/kept/: `eval` "
                             "then draws the learning curve; 0 = none")
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
        w = self.result_loss_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
            raise InputError(f"result_loss_weight must be a finite number > 0, got {w!r}")
        if not (isinstance(self.seq_warmup_frac, int | float) and 0 <= self.seq_warmup_frac < 1):
            raise InputError(f"seq_warmup_frac must be in [0, 1), got {self.seq_warmup_frac!r}")
        positive_int("seq_warmup_len")
        for name in ("readdress_src", "readdress_dst", "knowledge_dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
                raise InputError(f"{name} must be a fraction in [0, 1], got {v!r}")
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise InputError(f"warmdown_frac must be in [0, 1], got {self.warmdown_frac}")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be auto, bfloat16 or float32, got {self.dtype!r}")
        if self.wandb not in WANDB_MODES:
            raise InputError(f"wandb must be off, online or offline, got {self.wandb!r}")
        if not isinstance(self.knowledge, bool):
            raise InputError(f"knowledge must be true or false, got {self.knowledge!r}")
        if not isinstance(self.readdress_knowledge, bool):
            raise InputError("readdress_knowledge must be true or false, got "
                             f"{self.readdress_knowledge!r}")
        # It says which address's knowledge a re-addressed context reads: none without any.
        self.readdress_knowledge = self.readdress_knowledge and self.knowledge
        self.knowledge_dropout = self.knowledge_dropout if self.knowledge else 0.0
        if self.preset not in PRESETS:
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
                   "readdress_knowledge": False, "knowledge_dropout": 0.0,
                   "result_loss_weight": 1.0,
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
