"""A seeded Markov token stream that follows the training loader contract, without a dataset.

Tests, benchmarks and the GPU check train on `SyntheticLoader` when what they measure is the
training loop itself (speed, resume, DDP equivalence, learning below the unigram entropy), not
the data; `data.loader.build_loader` is the real loader. `mix_seed` is the stable seed both this
stream and the trainer's per-rank RNG derive from their parts.
"""

from __future__ import annotations

import hashlib

import torch

from ping_llm.errors import InputError


def mix_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class SyntheticLoader:
    """Seeded, structured synthetic token stream that follows the loader contract
    (`ping_llm.train`'s docstring).

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
        g = torch.Generator().manual_seed(mix_seed("table", seed))
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
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.split, g))
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
