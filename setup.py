"""The one build description of gmt_kernels: the Python package plus the C++ CPU kernels in csrc/.

The extension gmt_kernels._C is built from every csrc/*.cpp with torch's cpp_extension (the flags
live here and only here, in `compile_args`; CMakeLists.txt just calls this file). The extension is
optional: without torch at build time, without a C++ compiler, or when its compilation fails, the
package still installs and runs on the reference backend, and says why at build time and once at
run time (backend "cpu" unavailable, with the reason and how to fix it). Set
GMT_KERNELS_REQUIRE_EXTENSION=1 to make a failed compile fail the build instead. Build with
--no-build-isolation so the extension compiles against the torch you run (an isolated build would
download another torch).

No ISA flag (-march, -mavx2, ...) is passed anywhere: the AVX2 and AVX-512 variants of the kernels
are compiled in target regions of csrc/simd.h and picked at run time (csrc/cpu_capability.h), so
the binary runs on any CPU of its architecture, and aarch64 (NEON is baseline there) and MSVC get
only portable flags.
"""

import glob
import os
import platform
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")
ARM64_MACHINES = ("aarch64", "arm64", "armv8", "armv8l")


def target_machine() -> str:
    """The CPU architecture the extension is built for: the platform tag's (which cross-building
    tools such as crossenv or cibuildwheel set), else the running machine's."""
    tag = sysconfig.get_platform().rsplit("-", 1)[-1].lower()
    return tag if tag in X86_MACHINES + ARM64_MACHINES else platform.machine().lower()


def compile_args(machine: str, compiler_type: str, system: str = sys.platform) -> list:
    """Compiler flags of gmt_kernels._C for CPU architecture `machine` (x86_64, aarch64, arm64, ...)
    and a compiler of distutils type `compiler_type` ("unix" = GCC/clang, "msvc"). torch's
    BuildExtension adds its include paths and the C++ standard it needs (-std=c++20 for torch 2.13).
    tests/test_build.py cross-compiles csrc/ for aarch64 with exactly these flags."""
    machine = machine.lower()
    if compiler_type == "msvc":
        # /fp:precise (the default) never contracts a*b+c into an FMA; the SIMD variants are
        # GCC/clang-only, so an MSVC build runs the portable level.
        return ["/O2", "/openmp"]
    flags = [
        "-O3",
        "-fno-math-errno",
        # The update must round like torch's single-tensor AdamW: no a*b+c fused into an FMA (GCC
        # and clang fuse by default on aarch64, and would fuse the AVX2/AVX-512 intrinsics too).
        "-ffp-contract=off",
    ]
    if system != "darwin":
        flags.append("-fopenmp")
    return flags


def link_args(compiler_type: str, system: str = sys.platform) -> list:
    return [] if compiler_type == "msvc" or system == "darwin" else ["-fopenmp"]


ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
skip_reason = None
if os.environ.get("GMT_KERNELS_NO_EXTENSION") == "1":
    skip_reason = "GMT_KERNELS_NO_EXTENSION=1"
elif not sources:
    skip_reason = "no C++ sources in csrc/"
elif sys.platform != "win32" and shutil.which(os.environ.get("CXX", "c++")) is None:
    skip_reason = "no C++ compiler found (set CXX or install g++)"
else:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        skip_reason = "torch is not importable at build time (install torch first, build with --no-build-isolation)"

if skip_reason is None:

    class OptionalBuildExt(BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)):
        """BuildExtension with flags chosen for the actual compiler and target, and a failed
        compile reported instead of failing the install (the package works without _C)."""

        def build_extensions(self):
            machine = target_machine()
            for ext in self.extensions:
                ext.extra_compile_args = compile_args(machine, self.compiler.compiler_type)
                ext.extra_link_args = link_args(self.compiler.compiler_type)
            super().build_extensions()

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001  (any compiler/linker failure: report and go on)
                if os.environ.get("GMT_KERNELS_REQUIRE_EXTENSION") == "1":
                    raise
                print(
                    f"gmt_kernels: WARNING: the C++ CPU backend failed to build ({type(exc).__name__}: {exc}); "
                    "installing without it: the reference backend serves CPU tensors. To get it, fix the "
                    "compiler error above (a C++20 compiler and the torch you run are needed) and rebuild with "
                    "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`.",
                    file=sys.stderr,
                )

    ext_modules.append(CppExtension("gmt_kernels._C", sources))
    cmdclass["build_ext"] = OptionalBuildExt
else:
    print(f"gmt_kernels: building without the C++ CPU backend: {skip_reason}", file=sys.stderr)

if __name__ == "__main__":
    setup(
        packages=find_packages(include=["gmt_kernels", "gmt_kernels.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
