"""The build of the C++ extension (setup.py): portable flags per target, an optional extension (a
failed compile still installs the package), an sdist that carries every csrc/ file, and csrc/
compiling for aarch64 with the flags setup.py uses there (cross compiler, -fsyntax-only against
torch's headers).

The cross-compile test skips when aarch64-linux-gnu-g++ is absent (Debian/Ubuntu:
`apt-get install g++-aarch64-linux-gnu`), except under GMT_REQUIRE_CROSS_COMPILE=1 (set by .ci/run),
where its absence fails.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROSS_CXX = "aarch64-linux-gnu-g++"


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's functions, without running setup()."""
    return runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="gmt_kernels_setup")


@pytest.mark.parametrize("machine", ["x86_64", "AMD64", "aarch64", "arm64", "riscv64"])
@pytest.mark.parametrize("compiler_type", ["unix", "msvc"])
def test_compile_args_carry_no_isa_flags(setup_py, machine, compiler_type):
    """ISA variants live in target regions (csrc/simd.h), so no target gets an ISA flag, MSVC gets
    MSVC syntax only, and GCC/clang never contract a*b+c into an FMA (the update rounds like torch)."""
    flags = setup_py["compile_args"](machine, compiler_type, "linux")
    assert not [f for f in flags if f.startswith(("-m", "/arch"))], flags
    if compiler_type == "msvc":
        assert all(f.startswith("/") for f in flags), flags
    else:
        assert "-ffp-contract=off" in flags and "-O3" in flags
    assert "-fopenmp" not in setup_py["compile_args"](machine, "unix", "darwin")


def test_csrc_cross_compiles_for_aarch64(setup_py):
    cxx = shutil.which(CROSS_CXX)
    if cxx is None:
        message = f"{CROSS_CXX} not found (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)"
        if os.environ.get("GMT_REQUIRE_CROSS_COMPILE") == "1":
            pytest.fail(f"GMT_REQUIRE_CROSS_COMPILE=1 but {message}")
        pytest.skip(message)
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    # BuildExtension adds the C++ standard torch needs and the extension name; the rest is setup.py's.
    flags = ["-std=c++20", "-DTORCH_EXTENSION_NAME=_C", *setup_py["compile_args"]("aarch64", "unix", "linux")]
    # The NEON variants are compiled, not only the portable code.
    macros = subprocess.run([cxx, "-dM", "-E", *flags, *includes, os.path.join(ROOT, "csrc", "simd.h")],
                            capture_output=True, text=True)
    assert macros.returncode == 0, macros.stderr[-3000:]
    assert "#define GMT_SIMD_NEON 1" in macros.stdout and "GMT_SIMD_X86" not in macros.stdout

    def check(source):
        out = subprocess.run([cxx, "-fsyntax-only", *flags, *includes, source], capture_output=True, text=True)
        return source, out.returncode, out.stderr

    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        failures = [(s, err[-3000:]) for s, rc, err in pool.map(check, sources) if rc != 0]
    assert not failures, "\n".join(f"{s}:\n{err}" for s, err in failures)


def run_setup(tmp_path, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


def test_a_failed_compile_still_installs_and_says_why(tmp_path):
    """A source that does not compile: the build reports it and succeeds without gmt_kernels._C
    (the package then serves CPU tensors with the reference backend), unless
    GMT_KERNELS_REQUIRE_EXTENSION=1."""
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path)
    shutil.copytree(os.path.join(ROOT, "gmt_kernels"), tmp_path / "gmt_kernels",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "broken.cpp").write_text('#error "this compiler cannot build gmt_kernels"\n')
    out = run_setup(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "the C++ CPU backend failed to build" in out.stderr and "reference backend" in out.stderr
    assert "this compiler cannot build gmt_kernels" in out.stdout + out.stderr  # the compiler's own reason
    assert not glob.glob(str(tmp_path / "gmt_kernels" / "_C*"))
    assert run_setup(tmp_path, {"GMT_KERNELS_REQUIRE_EXTENSION": "1"}).returncode != 0


def test_sdist_carries_every_csrc_file(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip(f"not a git checkout ({tracked.stderr.strip()}): the sdist is built from one")
    for name in tracked.stdout.split():
        if os.path.exists(os.path.join(ROOT, name)):
            os.makedirs(tmp_path / "src" / os.path.dirname(name), exist_ok=True)
            shutil.copy(os.path.join(ROOT, name), tmp_path / "src" / name)
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")],
                         cwd=tmp_path / "src", capture_output=True, text=True,
                         env={**os.environ, "GMT_KERNELS_NO_EXTENSION": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    (archive,) = glob.glob(str(tmp_path / "dist" / "*.tar.gz"))
    with tarfile.open(archive) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    wanted = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*"))}
    assert wanted and wanted <= members, sorted(wanted - members)
    assert {"setup.py", "pyproject.toml", "gmt_kernels/backends/cpu.py"} <= members
