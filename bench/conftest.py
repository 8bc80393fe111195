"""pytest-benchmark runs the cases of bench/cases.py: `pytest bench/ [--bench-size tiny|quick|full]
[--bench-device cpu|cuda]`. The project's own suite (testpaths = tests) never collects this folder."""

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import cases  # noqa: E402
import measure  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("gmt_kernels bench")
    group.addoption("--bench-size", choices=sorted(cases.SIZES), default="quick",
                    help="which sizes of bench/cases.py to run (default: quick, what bench/run.py --quick runs)")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default="cpu")


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads its options
def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a gmt_kernels benchmark case (bench/, not part of tests/)")
    if getattr(config.option, "benchmark_columns", "unset") is None:
        config.option.benchmark_columns = ["median", "min", "max", "rounds"]  # medians, as run.py quotes
    measure.allocator_for_timing()
    if config.getoption("--bench-device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"--bench-device cuda asked, but this torch ({torch.__version__}) sees no CUDA device. "
            "Use --bench-device cpu, or run on a machine with a GPU and a CUDA build of torch."
        )


def pytest_collection_modifyitems(items):
    for item in items:
        if BENCH in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.bench)


def _size_and_device(config):
    return cases.SIZES[config.getoption("--bench-size")], config.getoption("--bench-device")


def pytest_generate_tests(metafunc):
    size, device = _size_and_device(metafunc.config)
    threshold_cases = cases.threshold_cases(size, device)
    if "threshold_case" in metafunc.fixturenames:
        runnable = [c for c in threshold_cases if c.expected_refusal is None]
        metafunc.parametrize("threshold_case", runnable, ids=lambda c: c.id)
    if "refused_case" in metafunc.fixturenames:
        refused = [c for c in threshold_cases if c.expected_refusal is not None]
        metafunc.parametrize("refused_case", refused, ids=lambda c: c.id)
    if "step_case" in metafunc.fixturenames:
        metafunc.parametrize("step_case", cases.step_cases(size, device), ids=lambda c: c.id)


@pytest.fixture
def bench_size(request):
    return cases.SIZES[request.config.getoption("--bench-size")]
