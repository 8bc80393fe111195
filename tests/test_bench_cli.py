"""bench/run.py checks what it needs before it measures (a missing optional dependency found after
minutes of measuring loses the run)."""

import importlib.util
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def load_run_module():
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_without_matplotlib_fails_before_measuring(monkeypatch, capsys):
    run = load_run_module()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    measured = []
    monkeypatch.setattr(run.cases, "threshold_cases", lambda *a: measured.append(1) or [])
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--quick", "--plot", "out.png"])
    assert exit_info.value.code == 2 and measured == []
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert run.parse_args(["--quick"]).plot is None  # without --plot, matplotlib is not needed
