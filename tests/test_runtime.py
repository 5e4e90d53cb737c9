"""runtime: a single process needs no launcher; signals ask for a clean stop instead of killing;
MFU peaks are only claimed for devices we know. (Multi-process DDP is tested in test_train.py.)"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from ping_llm.errors import InputError
from ping_llm.runtime import StopFlag, peak_flops_for, resolve_device, setup


def test_a_plain_process_is_rank_0_of_1_on_the_cpu(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    d = setup("cpu")
    assert (d.rank, d.local_rank, d.world_size, d.master, d.owns_group) == (0, 0, 1, True, False)
    assert d.device == torch.device("cpu")


@pytest.mark.parametrize("name", ["bogus", "mps", "gpu", "cuda:x", "cuda:99", ""])
def test_a_device_this_machine_does_not_have_is_a_clear_error(name):
    with pytest.raises(InputError, match="device"):
        resolve_device(name)


def test_auto_and_cuda_resolve_to_what_the_machine_has():
    want = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == want and resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match=r"device cuda:0 requested, but this torch"):
            setup("cuda")


def test_sigterm_and_sigint_set_the_stop_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signal_name == "SIGTERM"
        flag.signal_name = None
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C means "now"
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_no_mfu_peak_is_claimed_for_a_cpu():
    assert peak_flops_for(torch.device("cpu")) is None
