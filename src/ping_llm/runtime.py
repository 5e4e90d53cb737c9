"""Where a training process runs: device, torchrun process group, MFU peak, signals, logging.

`setup()` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), picks the device (CUDA
when available for "auto", one GPU per local rank) and joins the process group (NCCL on CUDA,
gloo on CPU); a single process needs no launcher. `StopFlag` turns SIGINT/SIGTERM into "finish
this step, checkpoint, exit". Rank 0 alone prints (`log0`) and shows the progress bar.
"""

from __future__ import annotations

import os
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


def setup(device: str = "auto") -> Dist:
    """This process's rank, world and device (from torchrun's environment); joins the process
    group when WORLD_SIZE > 1 (NCCL on CUDA, gloo otherwise). device: auto | cpu | cuda ..."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        want = f"cuda:{local_rank}"
    dev = torch.device(want)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device cuda requested but torch sees no CUDA device")
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


def all_gather(obj, d: Dist) -> list:
    if d.world_size == 1:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def log0(d: Dist, msg: str) -> None:
    if d.master:
        tqdm.write(msg, file=sys.stdout)  # plays well with the progress bar on stderr
        sys.stdout.flush()


def progress_bar(d: Dist, total: int, initial: int):
    """tqdm bar on stderr for rank 0 when stderr is a terminal; a no-op otherwise."""
    return tqdm(total=total, initial=initial, file=sys.stderr, disable=None if d.master else True,
                leave=False, dynamic_ncols=True, unit="step")
