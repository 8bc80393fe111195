"""The CPU capability switch of the C++ backend (gmt_kernels.backends.cpu): which ISA levels exist on
this machine, that every kernel's dispatch takes the level asked for (as the C++ side reports it),
and the errors for levels that cannot run. Results at each level are compared with the reference in
test_cpu_backend.py (its `capability` fixture)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import gmt_kernels
from gmt_kernels.backends import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTOR_KERNELS = ["masked_adamw", "histogram_whole", "histogram_interval", "histogram_sample",
                  "histogram_grad_over_weight", "histogram_random", "masked_adamw_grad_over_weight",
                  "masked_adamw_random", "masked_adamw_stored_mask"]


def expected_levels() -> list[str]:
    """The levels this CPU has, from its flags (/proc/cpuinfo), else from torch's own detection."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return ["neon", "default"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        torch_level = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
        return {"AVX512": ["avx512", "avx2", "default"], "AVX2": ["avx2", "default"]}.get(torch_level, ["default"])
    avx2 = {"avx2", "fma", "f16c", "popcnt"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    return ["avx512"] * avx512 + ["avx2"] * avx2 + ["default"]


def test_supported_levels_are_the_cpus():
    assert cpu.supported_capabilities() == expected_levels()
    if os.environ.get(cpu.CAPABILITY_ENV) is None:
        assert cpu.cpu_capability() == expected_levels()[0]  # the best level by default


@pytest.mark.parametrize("level", cpu.CAPABILITY_LEVELS)
def test_every_kernel_dispatches_to_the_level_set(level):
    if level not in cpu.supported_capabilities():
        pytest.skip(f"this CPU/build cannot run {level!r} (it runs {cpu.supported_capabilities()}); "
                    "test_unavailable_levels_are_refused checks the error")
    before = cpu.cpu_capability()
    with cpu.use_cpu_capability(level):
        assert cpu.cpu_capability() == level
        # Reported by the C++ dispatch (cpu::kernel_level), not derived here from the setting.
        assert cpu.kernel_capabilities() == {**dict.fromkeys(VECTOR_KERNELS, level), "histogram_f64_keys": "default"}
        info = gmt_kernels.backend_info()["cpu"]
        assert info["available"] and info["cpu_capability"] == level and info["kernel_capabilities"]["masked_adamw"] == level
    assert cpu.cpu_capability() == before


def test_unavailable_levels_are_refused_and_leave_the_level():
    before, possible = cpu.cpu_capability(), cpu.supported_capabilities()
    for level in [lv for lv in cpu.CAPABILITY_LEVELS if lv not in possible] + ["sse9", "AVX2"]:
        with pytest.raises(ValueError, match=rf"'{level}'.*possible here|'{level}'.*can run"):
            cpu.set_cpu_capability(level)
        with pytest.raises(ValueError, match=", ".join(possible)):
            cpu.set_cpu_capability(level)
        assert cpu.cpu_capability() == before
    with pytest.raises(ValueError), cpu.use_cpu_capability("default"):
        raise ValueError("inside the block")
    assert cpu.cpu_capability() == before  # restored on the way out of a failing block


def test_backend_info_keeps_available_backends_shape():
    assert gmt_kernels.available_backends()["cpu"] is None  # name -> None or reason, as before
    assert gmt_kernels.backend_info()["cpu"]["supported_capabilities"] == cpu.supported_capabilities()



PROBE = """
import json, warnings, torch, gmt_kernels
from gmt_kernels.backends import resolve
out = {"available": gmt_kernels.available_backends()["cpu"]}
if out["available"] is None:
    from gmt_kernels.backends import cpu
    out.update(level=cpu.cpu_capability(), kernels=cpu.kernel_capabilities())
else:
    try:
        resolve("cpu", torch.device("cpu"), torch.float32)
    except RuntimeError as exc:
        out["named_error"] = str(exc)
print(json.dumps(out))
"""


def probe(level: str) -> dict:
    import json

    env = {**os.environ, cpu.CAPABILITY_ENV: level, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_environment_variable_picks_the_level_when_the_extension_loads():
    lowest = probe("default")
    assert lowest["level"] == "default" and set(lowest["kernels"].values()) == {"default"}
    missing = [lv for lv in cpu.CAPABILITY_LEVELS if lv not in cpu.supported_capabilities()][0]
    for bad in (missing, "fastest"):
        refused = probe(bad)
        # The cpu backend does not load, saying why; named explicitly it raises with that reason.
        assert f"GMT_KERNELS_CPU_CAPABILITY={bad}" in refused["available"]
        assert ", ".join(cpu.supported_capabilities()) in refused["available"]
        assert f"GMT_KERNELS_CPU_CAPABILITY={bad}" in refused["named_error"]
