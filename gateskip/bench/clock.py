"""The bench's one clock: every timing in gateskip/bench reads `clock()` (tests/test_device.py checks
that no other module reads `time.perf_counter`).

A GPU runs the kernels a call queues after the call has returned, so a clock read right after it
measures the queueing, not the work. `clock()` first waits for every accelerator this process has
started (CUDA: each device, since a model may live on cuda:1; Apple's MPS), then reads the time. On
a CPU-only run there is nothing to wait for. Only the CPU path has been run here (no GPU machine).
"""

from __future__ import annotations

import sys
import time


def synchronize() -> None:
    """Wait until the work queued on every accelerator device this process has used is done."""
    torch = sys.modules.get("torch")  # not imported: nothing can be queued (the corpus queries' processes)
    if torch is None:
        return
    if torch.cuda.is_initialized():  # False until something touched CUDA: a CPU run pays nothing
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)
    if torch.backends.mps.is_available():
        torch.mps.synchronize()


CPU_TIME = False  # `gateskip bench --clock cpu`: this process's CPU time instead of wall time


def clock() -> float:
    """Seconds (`time.perf_counter`) once every device has finished what was queued before the call;
    with `CPU_TIME` (CPU runs on a shared machine) this process's CPU time (`time.process_time`), which
    leaves out the time other processes hold the cores."""
    synchronize()
    return time.process_time() if CPU_TIME else time.perf_counter()
