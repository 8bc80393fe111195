"""The machine a run measured: numbers mean nothing without it."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

# Before torch's first allocation (it reads this once): CPU tensors of 2 MiB or more on transparent
# huge pages. Without them, the pages a process happened to get moved one memory-bound GMT step
# (8 x 2^22 fp32) between 38 and 52 ms from process to process on this project's VM; with them it
# stayed at 38-40 ms. Every contender of a run allocates alike. THP_MEM_ALLOC_ENABLE=0 measures
# without; scripts import this module before torch.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str) -> dict:
    import gmt_kernels

    return dict(
        cpu=_cpu_model(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        memory_gib=_memory_gib(),
        gpu=torch.cuda.get_device_name() if device == "cuda" else None,
        torch=torch.__version__,
        triton=_version("triton"),
        python=platform.python_version(),
        gmt_kernels=gmt_kernels.__version__,
        # the CPU capability level the C++ kernels run at (None without the extension)
        gmt_kernels_cpu_level=gmt_kernels.backend_info().get("cpu", {}).get("cpu_capability"),
        commit=_commit(),
        platform=platform.platform(),
        huge_pages=os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",  # torch's CPU tensors (see the top)
        load_average_start=os.getloadavg(),
    )


def describe(machine: dict) -> str:
    text = f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB"
    if machine["gpu"]:
        text += f", {machine['gpu']}"
    if machine.get("gmt_kernels_cpu_level"):
        text += f"; C++ kernels at CPU level {machine['gmt_kernels_cpu_level']}"
    return f"{text}; torch {machine['torch']}, triton {machine['triton']}"


class OtherProcessesCpu:
    """The share of the machine's CPU time that other processes used between start and stop: the
    one number that says whether a run's timings can be trusted (torch's OpenMP threads wait for
    each other, so another process on one core can slow a parallel op by 10x or more)."""

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample():
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        ticks = [int(x) for x in fields]
        busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # all but idle and iowait (guest time is in user)
        mine = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), mine.user + mine.system, time.monotonic()

    def share(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None:
            return None
        busy, mine, wall = (b - a for a, b in zip(self._start, end))
        return max(0.0, (busy - mine) / (wall * (os.cpu_count() or 1)))


def describe_load(machine: dict) -> str:
    share = machine.get("other_processes_cpu_share")
    if share is None:
        return "CPU use of other processes unknown"
    text = f"other processes used {100 * share:.0f} % of the CPU time during the run"
    if share > 0.1:
        text += " (timings are disturbed: compare ratios, or re-run on an idle machine)"
    return text
