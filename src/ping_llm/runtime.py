"""Where a training process runs: device, torchrun process group, MFU peak, signals, logging.

`setup()` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), picks the device (CUDA
when available for "auto", one GPU per local rank) and joins the process group (NCCL on CUDA,
gloo on CPU); a single process needs no launcher. `StopFlag` turns SIGINT/SIGTERM into "finish
this step, checkpoint, exit". Rank 0 alone prints (`log0`) and shows the progress bar.
"""

from __future__ import annotations

import collections
import os
import pickle
import signal
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from ping_llm.errors import InputError

# Peak dense (no 2:4 sparsity) bf16 tensor-core FLOP/s per device, from the vendors' datasheets.
# Matched in order as a substring of torch.cuda.get_device_name(), so specific names come first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GH200", 989e12),  # Grace Hopper: the H100 SXM part
    ("H200", 989e12),  # same tensor cores as H100 SXM, more/faster memory
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("B200", 2250e12),
    ("A100", 312e12),  # SXM4 and PCIe, 40 and 80 GB
    ("L40S", 362e12),
    ("L4", 121e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
]


def peak_flops_for(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of one device from PEAK_BF16_FLOPS; None for CPUs and unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


@dataclass
class Dist:
    """This process in the run: global rank, rank on its node, world size, its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_group: bool

    @property
    def master(self) -> bool:
        return self.rank == 0


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> a device this machine has, else InputError.
    "cuda" is this process's GPU (its LOCAL_RANK); "auto" is CUDA when there is one."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name != "cpu" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise InputError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no GPU"
        raise InputError(f"device {name} requested, but this torch ({torch.__version__}) {why}")
    index, count = int(name[5:]), torch.cuda.device_count()
    if index >= count:
        raise InputError(f"device {name} requested, but torch sees {count} GPU(s)")
    return torch.device(name)


def setup(device: str = "auto") -> Dist:
    """This process's rank, world and device (from torchrun's environment); joins the process
    group when WORLD_SIZE > 1 (NCCL on CUDA, gloo otherwise). device: auto | cpu | cuda ..."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    if world > 1 and dist.get_world_size() != world:
        raise InputError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()}")
    return Dist(rank, local_rank, world, dev, owns)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, checkpoints and exits.

    A second SIGINT raises KeyboardInterrupt at once (the checkpoint on disk stays the last
    complete one). Handlers are only installed from the main thread and restored afterwards.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# Tensors handed to collectives stay referenced from Python until the process exits. Why: gloo's
# worker threads drop a finished work (and the works a barrier waited for) a little after wait()
# has returned. If that drops the last reference to a tensor whose Python object it then owns,
# the worker needs the GIL, and once the interpreter is shutting down that aborts the process
# ("terminate called without an active exception", exit -6 for a run that finished; seen on
# about 1 in 40 two-rank CPU runs). With a Python reference left, the drop is a plain count
# decrement. Holding the last few calls' tensors is enough: older works are long released.
_HELD: collections.deque = collections.deque(maxlen=16)


def all_reduce(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum `t` over the ranks, in place (a no-op in one process)."""
    if d.world_size > 1:
        _HELD.append(t)
        dist.all_reduce(t)
    return t


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def all_gather(obj, d: Dist) -> list:
    """Every rank's `obj` (picklable), in rank order; what all_gather_object does, with the
    tensors held (above)."""
    if d.world_size == 1:
        return [obj]
    dev = d.device if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(dev)
    size = torch.tensor([data.numel()], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(d.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[: data.numel()] = data
    out = [torch.empty_like(padded) for _ in range(d.world_size)]
    dist.all_gather(out, padded)
    _HELD.extend([size, *sizes, padded, *out])
    return [
        pickle.loads(t[: int(n.item())].cpu().numpy().tobytes())
        for t, n in zip(out, sizes, strict=True)
    ]


def log0(d: Dist, msg: str) -> None:
    if d.master:
        tqdm.write(msg, file=sys.stdout)  # plays well with the progress bar on stderr
        sys.stdout.flush()


def progress_bar(d: Dist, total: int, initial: int):
    """tqdm bar on stderr for rank 0 when stderr is a terminal; a no-op otherwise."""
    return tqdm(total=total, initial=initial, file=sys.stderr, disable=None if d.master else True,
                leave=False, dynamic_ncols=True, unit="step")
