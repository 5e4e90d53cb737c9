"""The runner every query path goes through: one model, its forward, its KV budget, its window.

`Runner.forward` is the only place a query calls the model: it counts forwards (`forwards`) and
honours `CANCEL` (the server's way to stop a query whose asker went away, within one forward).
`max_rows` turns the KV budget into rows per batch, `check_len` refuses a sequence longer than the
model's window, `context` encodes a caller's context measurements. The RTT engine
(`query.engine`) and the other walks of the model (`query.generate`) both build on it, so neither
needs the other's internals.
"""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ping_llm import tokens as tk
from ping_llm.errors import InputError
from ping_llm.model import GPT, KVCache
from ping_llm.query.targets import as_context

# Cap on the KV cache of one batch (rows x positions x layers). Small on CPU: a fresh allocation
# of hundreds of MB page-faults, and copying prefixes into it then costs more than the forward.
KV_BUDGET_BYTES = {"cpu": 16 * 2**20, "cuda": 2**30}


class Cancelled(Exception):
    """Raised inside a query whose CANCEL event was set (its asker went away)."""


# Set to a threading.Event around a call (in the thread that runs it) to make every model forward
# of that call check it: a long query stops within one forward of the event being set.
CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "ping_llm_cancel", default=None
)


def softmax(logits: torch.Tensor) -> np.ndarray:
    """Probabilities in float64 on the CPU (sums that are exact enough to marginalise)."""
    return torch.softmax(logits.double(), dim=-1).cpu().numpy()


@dataclass
class ContextTokens:
    """A caller's context measurements and their tokens (what precedes a query measurement)."""

    measurements: list  # tokens.Measurement, in order
    tokens: list[int]
    last_time: int | None  # the last timestamp among them (the next delta counts from it)


class Runner:
    """One GPT in eval mode on its device, with the KV budget of a query batch."""

    def __init__(self, model: GPT, kv_budget_bytes: int | None = None):
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        if kv_budget_bytes is None:
            kv_budget_bytes = KV_BUDGET_BYTES.get(self.device.type, KV_BUDGET_BYTES["cpu"])
        self.kv_budget_bytes = int(kv_budget_bytes)
        c = self.config
        self._kv_bytes_per_token = c.n_layer * 2 * c.n_kv_head * c.head_dim * 4
        self.forwards = 0  # model forward calls so far (for stats and tests)

    def forward(self, idx, cache: KVCache | None, siblings: bool = False) -> torch.Tensor:
        """The model's logits (R, T, V) for token rows idx (R, T), extending cache (siblings: see
        `GPT.forward`); counts forwards and honours CANCEL."""
        stop = CANCEL.get()
        if stop is not None and stop.is_set():
            raise Cancelled("the query was cancelled")
        t = torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.device)
        self.forwards += 1
        with torch.inference_mode():
            logits, _ = self.model(t, kv_cache=cache, siblings=siblings)
        return logits  # (R, T, V) fp32

    def max_rows(self, max_len: int) -> int:
        """Rows of max_len tokens whose KV cache fits kv_budget_bytes."""
        return max(1, self.kv_budget_bytes // (max_len * self._kv_bytes_per_token))

    def check_len(self, n: int, what: str) -> None:
        """Refuse (InputError) a sequence of n tokens longer than the model's window."""
        if n > self.config.sequence_len:
            raise InputError(
                f"{what} needs {n} tokens, more than the model's sequence_len "
                f"{self.config.sequence_len}: shorten the context"
            )

    def context(self, context) -> ContextTokens:
        """A context's tokens: measurements in any `targets.as_context` shape (our dicts or
        tuples, tokens.Measurement, RIPE Atlas ping results as downloaded)."""
        ms = as_context(context)
        toks = tk.encode_reference(ms)
        last = next((m.time for m in reversed(ms) if m.time is not None), None)
        return ContextTokens(ms, toks, last)
