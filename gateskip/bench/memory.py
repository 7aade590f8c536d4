"""Peak resident memory of a fresh process that loads a model with gates and traces one sentence
(`gateskip bench --sections memory`), against the same with `--gates none` (skip 0: the trace
runs, so every weight has been read into memory). Each measurement is its own process, so
nothing one left behind counts against the next.

    python -m gateskip.bench.memory MODEL GATES [DEVICE DTYPE]   # prints the peaks in bytes (the bench section's)

On a CUDA device the weights live in device memory, so the probe also reports the device's peak
allocation (`torch.cuda.max_memory_allocated`) and the rows compare that too; not run here (no GPU).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import threading

SENTENCE = "The quick brown fox jumps over the lazy dog, and the gates decide which layers it skips."


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def peak_of(model: str, gates: str, device: str = "cpu", dtype: str = "float32") -> tuple[int, int]:
    """(peak RSS, peak CUDA allocation; 0 off CUDA) in bytes of a fresh process: load `model` with
    `gates` on `device` in `dtype`, trace one sentence."""
    result = subprocess.run(
        [sys.executable, "-m", "gateskip.bench.memory", model, gates, device, dtype],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory probe for {gates!r} failed: {result.stderr.strip().splitlines()[-1:]}")
    rss, device_peak = result.stdout.strip().splitlines()[-1].split()
    return int(rss), int(device_peak)


def bench_memory(model: str, specs: tuple[str, ...], log, device: str = "cpu", dtype: str = "float32") -> list[dict]:
    baseline, device_baseline = peak_of(model, "none", device, dtype)
    rows = [{"gates": "none", "peak_rss_mb": baseline / 2**20, "vs_no_gates": 1.0}]
    for spec in specs:
        peak, device_peak = peak_of(model, spec, device, dtype)
        rows.append({"gates": spec, "peak_rss_mb": peak / 2**20, "vs_no_gates": peak / baseline})
        log(f"memory {spec}: {peak / 2**20:.0f} MB peak, {peak / baseline:.2f}x --gates none")
        if device_baseline:  # a CUDA run: the weights' memory is the device's
            rows[-1].update(peak_device_mb=device_peak / 2**20, device_vs_no_gates=device_peak / device_baseline)
    if device_baseline:
        rows[0].update(peak_device_mb=device_baseline / 2**20, device_vs_no_gates=1.0)
    return rows


def _probe(model: str, gates: str, device: str = "cpu", dtype: str = "float32") -> None:
    import torch

    from gateskip_core import load_model

    torch.set_num_threads(1)
    gated = load_model(model, gates=gates, device=device, dtype=dtype)
    skip = 0.0 if gates == "none" else 0.25
    gated.trace(SENTENCE, skip=skip)
    on_cuda = gated.device.type == "cuda"
    print(_peak_rss(), torch.cuda.max_memory_allocated(gated.device) if on_cuda else 0)


def _peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM (reset at exec, unlike ru_maxrss, which a
    child started from a large parent inherits)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


if __name__ == "__main__":
    _probe(*sys.argv[1:5])
