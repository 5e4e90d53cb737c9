"""The GPT: a decoder-only Transformer over the 267-token measurement language.

The nanochat recipe, in one flat module so it reads top to bottom:

    idx (B, T) -> wte -> RMSNorm -> n_layer x Block -> RMSNorm -> lm_head -> softcap -> logits
    Block: x = x + attn(norm(x)); x = x + mlp(norm(x))
    attn: causal self-attention, RoPE, QK-norm, optional grouped-query (n_kv_head < n_head)
    mlp: Linear(C, 4C) -> ReLU^2 -> Linear(4C, C)

Every RMSNorm is parameterless (`F.rms_norm` without weight), no Linear has a bias, there is no
dropout, and the token embedding and lm_head are separate matrices (untied). Logits are computed
in fp32 and softcapped, `softcap * tanh(logits / softcap)`, so they lie in (-softcap, softcap).

Why these choices: they are what nanochat/modded-nanoGPT found to train fastest per FLOP with Muon
(see `ping_llm.optim`), and they keep the parameter set tiny and regular: all hidden weights are
2-D matrices (Muon), the rest is the embedding and the head (AdamW).

Optional address inputs, added to the token embedding before the first norm (both zero at
init, both read the tokens themselves, so every query path sees what training saw):
`prefix_slots` -> `pte`, a hashed row per /8, /16, /24, /32 (IPv6 /16../64) at the byte that
completes it (prefix memory, `prefix_buckets` rows a level); and `feats` -> `kproj` + `kte`,
what a geolocation database says about an address at the byte that completes it
(`ping_llm.knowledge`, attached as `GPT.knowledge`).

Inference: `KVCache` holds keys/values of earlier positions (and their token ids). The query
engine runs a shared prefix once with batch 1, `expand`s the cache to batch B (or `select`s
rows of it), then scores B continuations in one forward (`GPT.forward(idx, kv_cache=cache)`
returns logits for the new positions only); the batch-1 cache is untouched, so it can be
expanded again for the next set without recomputing the prefix.

Construction on a device without paying for a CPU init: `with torch.device("meta"): m = GPT(c)`,
then `m.to_empty(device=dev); m.init_weights()` (which also recomputes the RoPE tables, since
`to_empty` leaves buffers uninitialised).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ping_llm import tokens as tk
from ping_llm.errors import InputError

# ------------------------------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    """Model shape. Every field is overridable; `preset()` gives the named sizes.

    n_kv_head=None means "same as n_head" (plain multi-head attention); a divisor of n_head gives
    grouped-query attention, which shrinks the KV cache n_head/n_kv_head times.
    """

    sequence_len: int = 1024  # max context length in tokens (RoPE tables are this long)
    vocab_size: int = 267  # ping_llm.tokens.VOCAB_SIZE
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    n_embd: int = 128
    softcap: float = 15.0  # logits = softcap * tanh(logits / softcap)
    rope_base: float = 10000.0
    # Prefix memory: rows per level of the hashed prefix tables (0 = none; see PREFIX_LEVELS).
    prefix_buckets: int = 0
    # Address knowledge (ping_llm.knowledge): width of the dense per-address features and size
    # of the categorical-id table (0, 0 = none). Set together by `train --knowledge`.
    knowledge_dim: int = 0
    knowledge_vocab: int = 0

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InputError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head != 0:
            raise InputError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise InputError(
                f"head dim n_embd/n_head = {self.n_embd // self.n_head} must be even (RoPE "
                "rotates pairs of channels)"
            )
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head != 0:
            raise InputError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        for name in ("prefix_buckets", "knowledge_dim", "knowledge_vocab"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"GPTConfig.{name} must be an integer >= 0, got {v!r}")
        if (self.knowledge_dim > 0) != (self.knowledge_vocab > 0):
            raise InputError("knowledge_dim and knowledge_vocab are both 0 or both positive")
        if not (isinstance(self.softcap, int | float) and self.softcap > 0):
            raise InputError(f"softcap must be a positive number, got {self.softcap!r}")
        if not (isinstance(self.rope_base, int | float) and self.rope_base > 1):
            raise InputError(f"rope_base must be a number > 1, got {self.rope_base!r}")
        self.softcap = float(self.softcap)
        self.rope_base = float(self.rope_base)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """A named size (`tiny`, `small`, `full`) with any field overridden."""
        if name not in PRESETS:
            raise InputError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        """Plain JSON-able dict (config.json); n_kv_head is written resolved."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown GPTConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# Named sizes. Parameter counts (vocab 267): tiny 0.86M, small 98.6M, full 680.3M; see
# tests/test_model.py for the formula. The "~95M" for small in the original author's notes is his
# rounding (98.6M params = 94 Mi); the architecture (20 x 640 x 10 heads) is what is specified.
#
# tiny: 4 layers x 128 wide x 4 heads (head_dim 32), full 1024-token contexts. It is sized for
# 2 CPU cores: ~11 MFLOP/token for forward+backward (6N = 4.7M plus the attention term 6.3M at
# T=1024); measured ~10k tokens/s forward+backward+optimizer with 2 threads on this 2-core box
# (batch 8 x 1024; ~5k tokens per CPU-second single-threaded), so a few million tokens (a useful
# run on the synthetic Internet) take minutes. Keeping sequence_len at 1024 means tiny exercises
# exactly the context sampler and query shapes the big models use; sequence_len=256 is ~1.5x
# faster per token (attention is ~1/3 of the time at 1024).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, sequence_len=1024),
    "small": dict(n_layer=20, n_embd=640, n_head=10, sequence_len=1024),
    "full": dict(n_layer=24, n_embd=1536, n_head=12, sequence_len=1024),
}


# ------------------------------------------------------------------------------------------------
# building blocks


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameterless RMSNorm over the last dim."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, T, H, D) by position-dependent angles.

    cos, sin: (1, T, 1, D/2) fp32, cast to x's dtype (bf16 under autocast) before use.
    """
    d = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1)


class KVCache:
    """Keys and values of the positions seen so far, for incremental inference.

    Storage: one tensor (n_layer, 2, B, n_kv_head, max_len, head_dim), allocated on the first
    insert with the dtype/device of the keys (so bf16 under autocast). `pos` is the number of
    positions already stored; `GPT.forward` writes positions [pos, pos + T) in every layer, then
    advances `pos` by T (and offsets RoPE by `pos`).

    Typical query-engine use::

        cache = KVCache(config, batch_size=1, max_len=prefix_len + cont_len)
        model(prefix[None], kv_cache=cache)           # run the shared prefix once
        batch = cache.expand(B)                       # B independent copies of it
        logits, _ = model(continuations, kv_cache=batch)   # (B, T_cont, V)
        batch = cache.expand(B)                       # the prefix again, for the next set
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None):
        max_len = config.sequence_len if max_len is None else max_len
        if batch_size <= 0 or max_len <= 0:
            raise InputError(f"KVCache needs batch_size, max_len > 0, got {batch_size}, {max_len}")
        self.config = config
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0
        self.kv: torch.Tensor | None = None  # (n_layer, 2, B, n_kv_head, max_len, head_dim)
        # The token ids seen so far (B, max_len): prefix memory and address knowledge of a new
        # position depend on the address bytes before it. 8 bytes a position against the
        # n_layer * 2 * n_kv_head * head_dim * 4 of the keys and values: noise.
        self.idx: torch.Tensor | None = None

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, n_kv_head, T, head_dim) at [pos, pos+T); return all keys/values so far
        as views (B, n_kv_head, pos+T, head_dim). Does not advance `pos` (the model does, once
        per forward, after the last layer)."""
        B, H, T, D = k.shape
        if self.batch_size != B:
            raise InputError(f"KVCache holds batch {self.batch_size}, forward got batch {B}")
        if self.kv is None:
            c = self.config
            self.kv = torch.zeros(
                (c.n_layer, 2, self.batch_size, H, self.max_len, D), dtype=k.dtype, device=k.device
            )
        end = self.pos + T
        if end > self.max_len:
            raise InputError(f"KVCache overflow: {end} positions > max_len {self.max_len}")
        self.kv[layer, 0, :, :, self.pos : end] = k
        self.kv[layer, 1, :, :, self.pos : end] = v
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values stored so far in `layer`, (B, n_kv_head, pos, head_dim) views."""
        return self.kv[layer, 0, :, :, : self.pos], self.kv[layer, 1, :, :, : self.pos]

    def history(self, idx: torch.Tensor) -> torch.Tensor:
        """The last ADDRESS_LOOKBACK cached token ids followed by the new ones idx (B, T)."""
        if self.idx is None:
            self.idx = idx.new_zeros((self.batch_size, self.max_len))
        start = max(0, self.pos - tk.ADDRESS_LOOKBACK)
        return torch.cat([self.idx[:, start : self.pos], idx], dim=1)

    def advance(self, idx: torch.Tensor) -> None:
        """Record the new positions' token ids (B, T) and move `pos` past them."""
        T = idx.shape[1]
        if self.idx is not None:
            self.idx[:, self.pos : self.pos + T] = idx
        self.pos += T

    def select(self, rows) -> KVCache:
        """A new cache whose row i is row rows[i] of this one (same positions): how the query
        engine branches one prefix into many continuations or keeps the best beams."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        new = KVCache(self.config, len(rows), self.max_len)
        if self.kv is not None:
            new.kv = self.kv.index_select(2, rows.to(self.kv.device))
        if self.idx is not None:
            new.idx = self.idx.index_select(0, rows.to(self.idx.device))
        new.pos = self.pos
        return new

    def narrow(self, start: int, stop: int) -> KVCache:
        """Rows [start, stop) as a cache that shares this one's storage: for reading (siblings),
        not for writing, which would write here too."""
        new = KVCache(self.config, stop - start, self.max_len)
        if self.kv is not None:
            new.kv = self.kv[:, :, start:stop]
        if self.idx is not None:
            new.idx = self.idx[start:stop]
        new.pos = self.pos
        return new

    def expand(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A new cache of `batch_size` rows, each a copy of this batch-1 cache's positions.

        This cache is left untouched, so the prefix can be expanded again later.
        """
        if self.batch_size != 1:
            raise InputError(f"expand needs a batch-1 cache, this one has batch {self.batch_size}")
        max_len = self.max_len if max_len is None else max_len
        if max_len < self.pos:
            raise InputError(f"max_len {max_len} is shorter than the cached prefix {self.pos}")
        new = KVCache(self.config, batch_size, max_len)
        if self.kv is not None:
            L, two, _, H, _, D = self.kv.shape
            new.kv = self.kv.new_zeros((L, two, batch_size, H, max_len, D))
            new.kv[:, :, :, :, : self.pos] = self.kv[:, :, :, :, : self.pos]  # broadcast over B
        if self.idx is not None:
            new.idx = self.idx.new_zeros((batch_size, max_len))
            new.idx[:, : self.pos] = self.idx[:, : self.pos]
        new.pos = self.pos
        return new


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        C = config.n_embd
        self.c_q = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)

    def forward(self, x, cos, sin, kv_cache: KVCache | None, siblings: bool = False):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # RoPE then QK-norm (nanochat's order; the two commute up to rounding since RoPE is a
        # rotation and RMSNorm only rescales). QK-norm bounds attention logits by sqrt(D).
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)

        if kv_cache is None:
            prefix = 0  # training / full forward: plain causal attention
        elif siblings:  # read the cache, write nothing: the T tokens are alternatives
            prefix = kv_cache.pos
            ck, cv = kv_cache.view(self.layer_idx)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)  # (B, Hkv, prefix+T, D)
        else:
            prefix = kv_cache.pos
            k, v = kv_cache.insert(self.layer_idx, k, v)  # (B, Hkv, prefix+T, D)
        if self.n_kv_head != self.n_head:  # grouped-query: share each kv head by n_rep q heads
            n_rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)

        # Python branches on shapes/ints only (no tensor data), so torch.compile stays happy.
        if siblings:  # each new token sees the cache and itself, not the other alternatives
            own = torch.eye(T, dtype=torch.bool, device=q.device)
            mask = torch.cat([own.new_ones(T, prefix), own], dim=1)  # (T, prefix+T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif prefix == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new query sees the whole cache
        else:
            # New query i (absolute position prefix+i) sees keys 0..prefix+i.
            qpos = torch.arange(prefix, prefix + T, device=q.device)[:, None]
            kpos = torch.arange(prefix + T, device=q.device)[None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kpos <= qpos)  # (B,H,T,D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, siblings=False):
        x = x + self.attn(norm(x), cos, sin, kv_cache, siblings)
        x = x + self.mlp(norm(x))
        return x


# ------------------------------------------------------------------------------------------------
# prefix memory

# Where an address's prefix is looked up: after how many known bytes, per IP version. IPv4 at
# /8, /16, /24 and /32; IPv6 at /16, /32, /48 and /64 (beyond /64 are interface ids: per host,
# often random). Level i of version 4 uses table rows [1 + i*buckets, 1 + (i+1)*buckets); IPv6's
# levels follow IPv4's; row 0 is the zero row of every other position.
PREFIX_LEVELS = {4: (1, 2, 3, 4), 6: (2, 4, 6, 8)}
_HASH_MOD = 2**31 - 1  # a Mersenne prime: the rolling hash stays below 2**31 (int64-safe)
_HASH_MUL = 2654435761  # Knuth's multiplicative constant, mixes the low bits before the modulo


def prefix_slots(idx: torch.Tensor, buckets: int) -> torch.Tensor:
    """Row of the prefix-memory table for every position of idx (B, T) -> (B, T) int64.

    At the byte that completes a PREFIX_LEVELS prefix of an address (source or destination
    alike: a network is the same place from either end), the row is a hash of the version and
    the bytes so far, folded into that level's `buckets` rows; elsewhere 0. Colliding prefixes
    share a row, which costs only when both are frequent (4,096 rows a level hold every /24 of
    a campaign of a few hundred probes). Torch ops only, so it runs on the model's device.
    """
    version, n = tk.address_progress(idx)
    h = torch.where(version == 6, 2, 1).to(torch.int64)
    for back in range(tk.ADDRESS_LOOKBACK - 1, -1, -1):  # the oldest byte of the address first
        byte = F.pad(idx, (back, 0))[:, : idx.shape[1]] - tk.BYTE0 + 1  # (B, T) byte at t-back
        h = torch.where(n > back, (h * 257 + byte) % _HASH_MOD, h)
    slot = torch.zeros_like(idx)
    for version_, levels in PREFIX_LEVELS.items():
        first = 0 if version_ == 4 else len(PREFIX_LEVELS[4])
        for i, nbytes in enumerate(levels):
            at = (version == version_) & (n == nbytes)
            row = 1 + (first + i) * buckets + (h * _HASH_MUL) % _HASH_MOD % buckets
            slot = torch.where(at, row, slot)
    return slot


def prefix_rows(buckets: int) -> int:
    """Rows of the prefix-memory table (0 when there is none)."""
    return 1 + buckets * sum(map(len, PREFIX_LEVELS.values())) if buckets else 0


# ------------------------------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        )
        if config.prefix_buckets:  # prefix memory: one embedding row per hashed prefix
            modules["pte"] = nn.Embedding(prefix_rows(config.prefix_buckets), config.n_embd)
        if config.knowledge_dim:  # address knowledge: dense features and categorical ids
            modules["kproj"] = nn.Linear(config.knowledge_dim, config.n_embd, bias=False)
            modules["kte"] = nn.Embedding(config.knowledge_vocab, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        # The address-knowledge source (ping_llm.knowledge.AddressKnowledge): not a module, not
        # saved; the run records which database it was and checkpoint.load_model reattaches it.
        self.knowledge = None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # RoPE tables: fp32, not saved (persistent=False) since they follow from the config.
        cos, sin = self._rotary_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    def _rotary_tables(self, device=None):
        c = self.config
        D = c.head_dim
        inv_freq = 1.0 / (c.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        t = torch.arange(c.sequence_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, D/2)
        cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)
        if device is not None:
            cos, sin = cos.to(device), sin.to(device)
        return cos, sin

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init. Every block starts as the identity (zero output projections), so
        at step 0 the residual stream is just the normalised embedding and depth cannot blow it
        up; Muon's first updates then grow the projections at a controlled, orthogonal rate.

        Prefix memory and knowledge start at zero, so a model with them starts as one without
        and a prefix never seen in training adds nothing (not noise) at query time.
        wte ~ N(0, 1) (it is RMS-normalised right away); lm_head ~ N(0, 0.001) (near-uniform
        initial predictions, loss ~ ln V); c_q, c_k, c_v, c_fc ~ U(-s, s) with s = sqrt(3/C),
        i.e. std 1/sqrt(C) (uniform: no outliers).
        """
        C = self.config.n_embd
        s = (3.0 / C) ** 0.5
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for name in ("pte", "kproj", "kte"):
            if name in self.transformer:
                nn.init.zeros_(self.transformer[name].weight)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        if self.cos.device.type != "meta":  # on meta there is nothing to fill
            cos, sin = self._rotary_tables(device=self.cos.device)
            self.cos.copy_(cos)
            self.sin.copy_(sin)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_reduction: str = "mean",
        feats: tuple[torch.Tensor, torch.Tensor] | None = None,
        siblings: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) int64 token ids -> (logits, loss).

        logits: (B, T, vocab_size) fp32, softcapped, always returned (vocab is 267, so the fp32
            logits are small: 8 x 1024 x 267 x 4 B = 8.7 MB).
        loss: None without targets; else fp32 cross-entropy against targets (B, T) int64 where -1
            means "no target here". loss_reduction "mean" (default: mean over non-ignored
            positions; NaN if every target is -1), "sum", or "none" ((B, T), 0 where ignored).
        kv_cache: positions [cache.pos, cache.pos + T) are computed attending to the cache, and
            the cache advances by T; logits are for the new positions only.
        feats: address knowledge for idx's positions, `address_features(idx)`; computed here
            when None (training passes it, computed on the CPU beside the batch).
        siblings: with a kv_cache, the T tokens of a row are alternatives for its next position
            (each at position cache.pos, attending to the cache and itself only), and the cache
            is neither written nor advanced: how the query engine scores every refined byte1 bin
            of a row without copying the row's cache once per bin.
        """
        B, T = idx.shape
        t0 = 0 if kv_cache is None else kv_cache.pos
        if siblings and t0 == 0:
            raise InputError("siblings need a kv_cache that holds a prefix")
        n_pos = 1 if siblings else T  # siblings all sit at position t0
        if t0 + n_pos > self.config.sequence_len:
            raise InputError(
                f"sequence of {t0 + n_pos} tokens exceeds the model's sequence_len "
                f"{self.config.sequence_len}"
            )
        cos, sin = self.cos[:, t0 : t0 + n_pos], self.sin[:, t0 : t0 + n_pos]  # (1, T, 1, D/2)

        x = self.transformer.wte(idx)  # (B, T, C)
        c = self.config
        if c.prefix_buckets or c.knowledge_dim:
            if siblings:  # each alternative follows the cached tokens on its own
                tail = kv_cache.history(idx[:, :0])  # (B, lookback)
                hist = torch.cat([tail.repeat_interleave(T, 0), idx.reshape(B * T, 1)], 1)
            else:
                hist = idx if kv_cache is None else kv_cache.history(idx)  # (B, lookback + T)
            if c.prefix_buckets:
                slots = prefix_slots(hist, c.prefix_buckets)[:, -n_pos:]
                x = x + self.transformer.pte(slots.reshape(B, T))
            if c.knowledge_dim:
                if feats is None:
                    feats = tuple(f[:, -n_pos:].reshape(B, T, *f.shape[2:])
                                  for f in self.address_features(hist))
                dense, ids = feats  # (B, T, knowledge_dim), (B, T, K)
                x = x + self.transformer.kproj(dense.to(x.dtype)) + self.transformer.kte(ids).sum(2)
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache, siblings)
        x = norm(x)
        if kv_cache is not None and not siblings:
            kv_cache.advance(idx)

        logits = self.lm_head(x)  # (B, T, V)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # fp32 under bf16 autocast; a float64 model stays float64
        cap = self.config.softcap
        logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)),  # (B*T, V)
            targets.reshape(-1),  # (B*T,)
            ignore_index=-1,
            reduction=loss_reduction,
        )
        if loss_reduction == "none":
            loss = loss.view(B, T)
        return logits, loss

    def address_features(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The knowledge features of idx's (B, T) positions, on the model's device."""
        if self.knowledge is None:
            raise InputError("this model reads address knowledge but none is attached "
                             "(load it with checkpoint.load_model, which opens the run's database)")
        dense, ids = self.knowledge.features(idx.cpu())
        dev = self.transformer.wte.weight.device
        return dense.to(dev), ids.to(dev)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters; exclude_embedding leaves out the lookup tables (wte, prefix memory, the
        knowledge ids), which cost no FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            for name in ("wte", "pte", "kte"):
                if name in self.transformer:
                    n -= self.transformer[name].weight.numel()
        return n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), for MFU.

        6 x (params that do matmuls: everything but the embedding lookup, lm_head included)
        + 12 x n_layer x n_head x head_dim x T for the attention scores and weighted sum
        (the PaLM appendix B formula, as nanochat; it counts the full T x T square, not the
        causal half, so MFU numbers compare with nanochat's). T defaults to sequence_len.
        """
        c = self.config
        T = c.sequence_len if seq_len is None else seq_len
        return 6 * self.num_params(exclude_embedding=True) + 12 * c.n_layer * c.n_embd * T

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample max_new_tokens after each row of idx (B, T) with a KV cache -> (B, new)."""
        B, T = idx.shape
        cache = KVCache(self.config, B, T + max_new_tokens)
        logits, _ = self(idx, kv_cache=cache)
        logits = logits[:, -1]  # (B, V)
        out = []
        for _ in range(max_new_tokens):
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            out.append(nxt)
            if len(out) == max_new_tokens:
                break
            logits, _ = self(nxt, kv_cache=cache)
            logits = logits[:, -1]
        return torch.cat(out, dim=1) if out else idx.new_zeros((B, 0))
