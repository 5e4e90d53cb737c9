"""Optimisers and the LR schedule: Muon for hidden matrices, AdamW for the rest.

- `Muon`: SGD with Nesterov momentum whose update for each 2-D weight is replaced by (roughly) the
  nearest semi-orthogonal matrix, computed with a quintic Newton–Schulz iteration (Keller Jordan's
  Muon, as in nanochat / modded-nanoGPT). Every singular direction of the update moves by about
  the same amount, which is what lets the hidden matrices train at a large, width-independent lr.
- `build_optimizers(model)`: Muon for the 2-D weights inside the blocks, AdamW for the token
  embedding, the lm_head and anything else (1-D/scalar params), with nanochat's learning rates and
  the AdamW lrs scaled by (n_embd / 768) ** -0.5 (tuned at width 768).
- `lr_multiplier(...)`: warmup–stable–decay; `muon_momentum(...)`: nanochat's momentum warmup.

The training loop applies the schedule by setting, every step, for every group of every optimiser,
`group["lr"] = group["initial_lr"] * lr_multiplier(step, ...)` (and for Muon groups optionally
`group["momentum"] = muon_momentum(step)`).

DDP: `Muon` is not sharded. Under DistributedDataParallel the gradients are already all-reduced
(averaged) by backward, so every rank runs the same Newton–Schulz on the same averaged gradient and
applies the same update; weights stay identical across ranks without any communication here. It
costs world_size x redundant NS compute (a few % of a step for these sizes), the simplest correct
choice. The optimiser state holds only tensors and plain Python scalars/strings, so
`state_dict()` saves and loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from ping_llm.errors import InputError

# Quintic Newton–Schulz coefficients (Keller Jordan's Muon; nanochat; torch.optim.Muon). They
# maximise the slope at 0 rather than converge exactly, so after 5 steps singular values land in
# roughly [0.7, 1.2] instead of exactly 1, which trains as well as the exact polar factor.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def zeropower_via_newtonschulz5(
    G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16, eps: float = NS_EPS
) -> torch.Tensor:
    """Approximate U V^T for G = U S V^T (the "zeroth power" of G) with `steps` quintic NS steps.

    G: (rows, cols). Works on the wide orientation (rows <= cols) so that X X^T is the small
    Gram matrix. Runs in `dtype` (bf16 on GPU is fast and stable for this iteration), returns a
    tensor in `dtype`. Mirrors torch.optim.Muon's arithmetic (addmm), so in bf16 the two agree
    to the last bit up to kernel differences.
    """
    if G.ndim != 2:
        raise ValueError(f"Newton–Schulz needs a 2-D matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: all singular values <= 1
    for _ in range(steps):
        A = X @ X.T  # (r, r) Gram matrix
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        X = torch.addmm(X, B, X, beta=a)  # a*X + B@X
    return X.T if tall else X


_NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz, for 2-D hidden weights only.

    Per step, for each parameter W (rows, cols) with gradient G:
        buf = momentum * buf + (1 - momentum) * G            (an EMA, as nanochat)
        U = lerp(G, buf, momentum) if nesterov else buf      (Nesterov look-ahead)
        O = NS5(U)                                           (singular values ~ 1)
        W = W * (1 - lr * weight_decay)                      (decoupled; 0 by default)
        W = W - lr * max(1, rows/cols) ** 0.5 * O
    The shape factor keeps the per-element update RMS the same for tall matrices (e.g. c_fc's
    transpose orientation: an orthogonal (4C, C) matrix has smaller entries than a square one).

    ns_dtype: "auto" (bf16 on CUDA, fp32 elsewhere: CPU bf16 matmul is slow and not needed),
    "bfloat16" or "float32". A string, not a torch.dtype, so state_dict() stays pickle-free.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        ns_dtype: str = "auto",
    ):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(
                f"bad Muon hyperparameters lr={lr} momentum={momentum} "
                f"weight_decay={weight_decay} ns_steps={ns_steps}"
            )
        if ns_dtype not in ("auto", *_NS_DTYPES):
            raise ValueError(f"ns_dtype must be 'auto', 'bfloat16' or 'float32', got {ns_dtype!r}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mom)
                u = g.lerp(buf, mom) if group["nesterov"] else buf  # leaves p.grad untouched
                name = group["ns_dtype"]
                if name == "auto":
                    name = "bfloat16" if p.device.type == "cuda" else "float32"
                o = zeropower_via_newtonschulz5(u, group["ns_steps"], _NS_DTYPES[name])
                if wd != 0:
                    p.mul_(1 - lr * wd)
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.add_(o.to(p.dtype), alpha=-lr * scale)
        return loss


def build_optimizers(
    model: nn.Module,
    *,
    matrix_lr: float = 0.02,
    embedding_lr: float = 0.2,
    unembedding_lr: float = 0.004,
    memory_lr: float = 0.2,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.8, 0.95),
) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] for a `ping_llm.model.GPT` (nanochat's split and learning rates).

    Muon ("matrix" group): every 2-D parameter inside `model.transformer.h` (the blocks), lr
        `matrix_lr` (Muon's lr is already width-independent: the update is orthogonal).
    AdamW, lr x (n_embd / 768) ** -0.5 each: "embedding" (wte, `embedding_lr`), "unembedding"
        (lm_head, `unembedding_lr`), "memory" (the prefix-memory table, `memory_lr`, no weight
        decay: a rare prefix's row must not fade between its visits) and "other" for anything
        else (the address-knowledge projection and table; at `embedding_lr`, no weight decay),
        eps 1e-10.
    weight_decay (decoupled) applies to the Muon matrices and to wte/lm_head.
    Every group carries "name" and "initial_lr" (= its lr now), which the training loop
    multiplies by `lr_multiplier(...)`. Every parameter is in exactly one group. `model` may be
    wrapped in DDP and/or torch.compile (the wrappers share the parameters).
    """
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):  # DDP / torch.compile wrappers
        model = getattr(model, "module", None) or model._orig_mod
    n_embd = model.config.n_embd
    scale = (n_embd / 768) ** -0.5
    block_ids = {id(p) for p in model.transformer.h.parameters()}
    wte, head = model.transformer.wte.weight, model.lm_head.weight
    pte = model.transformer.pte.weight if "pte" in model.transformer else None
    matrix, other = [], []
    for p in model.parameters():
        if id(p) in block_ids and p.ndim == 2:
            matrix.append(p)
        elif p is not wte and p is not head and p is not pte:
            other.append(p)
    adam_groups = [
        dict(params=[wte], lr=embedding_lr * scale, weight_decay=weight_decay, name="embedding"),
        dict(
            params=[head], lr=unembedding_lr * scale, weight_decay=weight_decay, name="unembedding"
        ),
    ]
    if pte is not None:
        adam_groups.append(
            dict(params=[pte], lr=memory_lr * scale, weight_decay=0.0, name="memory")
        )
    if other:
        adam_groups.append(
            dict(params=other, lr=embedding_lr * scale, weight_decay=0.0, name="other")
        )
    adamw = torch.optim.AdamW(adam_groups, betas=betas, eps=1e-10)
    muon = Muon(
        [dict(params=matrix, name="matrix")],
        lr=matrix_lr,
        momentum=0.95,
        weight_decay=weight_decay,
    )
    optimizers: list[torch.optim.Optimizer] = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int,
    warmdown_frac: float,
    final_lr_frac: float = 0.0,
) -> float:
    """Warmup–stable–decay multiplier for step `step` (0-based) of a `total_steps` run.

    Linear warmup 0 -> 1 over [0, warmup_steps] (exactly 0 at step 0 when warmup_steps > 0);
    flat at 1; linear decay 1 -> final_lr_frac over the last round(warmdown_frac * total_steps)
    steps, reaching final_lr_frac at step == total_steps (and staying there after). If warmup
    and warmdown overlap (very short runs) the smaller of the two ramps wins.
    """
    if total_steps <= 0 or warmup_steps < 0 or step < 0:
        raise InputError(
            f"lr schedule needs total_steps > 0, warmup_steps >= 0, step >= 0; "
            f"got {total_steps}, {warmup_steps}, {step}"
        )
    if not 0.0 <= warmdown_frac <= 1.0 or not 0.0 <= final_lr_frac <= 1.0:
        raise InputError(
            f"warmdown_frac and final_lr_frac must be in [0, 1]; got {warmdown_frac}, "
            f"{final_lr_frac}"
        )
    up = 1.0 if step >= warmup_steps else step / warmup_steps
    warmdown_steps = round(warmdown_frac * total_steps)
    if warmdown_steps == 0:
        down = 1.0
    else:
        left = max(total_steps - step, 0) / warmdown_steps  # >= 1 before the warmdown starts
        down = final_lr_frac + (1.0 - final_lr_frac) * min(left, 1.0)
    return min(up, down)


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95):
    """nanochat's Muon momentum warmup: linear from `start` to `end` over `warmup_steps`."""
    frac = 1.0 if warmup_steps <= 0 else min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end
