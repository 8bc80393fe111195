"""`python -m gmt_kernels.selfcheck`: the user's check of the kernels on their own hardware."""

import dataclasses
import json
import os
import subprocess
import sys

import torch

from gmt_kernels import backends, selfcheck
from gmt_kernels.backends import cpu


def test_selfcheck_checks_every_cpu_level_and_writes_json(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    result = subprocess.run([sys.executable, "-m", "gmt_kernels.selfcheck", "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selfcheck: PASSED" in result.stdout
    report = json.loads(out.read_text())
    levels = cpu.supported_capabilities()
    assert {c["level"] for c in report["checks"]} == set(levels)
    assert [s["level"] for s in report["speed"]] == levels
    assert all(c["ok"] for c in report["checks"]) and report["ok"]
    assert {c["case"] for c in report["checks"]} == {c.name for c in selfcheck.cases(quick=True)}
    for level in levels:  # the kernels really ran at the level the row names
        assert report["kernel_levels"][level]["masked_adamw"] == level
        assert set(report["kernel_levels"][level].values()) <= {level, "default"}


def test_a_kernel_that_drifts_is_reported(monkeypatch):
    real = backends._REGISTRY["cpu"]

    def drifting(params, *args, **kwargs):
        real.masked_adamw(params, *args, **kwargs)
        params[0].view(-1)[0] += 1e-3  # one entry, once per step

    monkeypatch.setitem(backends._REGISTRY, "cpu", dataclasses.replace(real, masked_adamw=drifting))
    case = selfcheck.Case("drift", ((5,), (300,)))
    result = selfcheck.check_case(case, "cpu", torch.device("cpu"))
    assert not result["ok"] and "param of tensor 0" in result["problems"][0]
    clean = selfcheck.check_case(case, "reference", torch.device("cpu"))
    assert clean["ok"] and clean["max_rel_error"] == 0.0
