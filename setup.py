"""The one build description of gmt_kernels: the Python package plus the C++ CPU kernels in csrc/.

The extension gmt_kernels._C is built from every csrc/*.cpp with torch's cpp_extension (the flags
live here and only here; CMakeLists.txt just calls this file). Without torch at build time, or
without a C++ compiler, the package still installs and runs on the reference backend; it then
warns once at run time that the C++ backend is missing. Build with --no-build-isolation so the
extension compiles against the torch you run (an isolated build would download another torch).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
skip_reason = None
if os.environ.get("GMT_KERNELS_NO_EXTENSION") == "1":
    skip_reason = "GMT_KERNELS_NO_EXTENSION=1"
elif not sources:
    skip_reason = "no C++ sources in csrc/"
elif shutil.which(os.environ.get("CXX", "c++")) is None:
    skip_reason = "no C++ compiler found (set CXX or install g++)"
else:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        skip_reason = "torch is not importable at build time (install torch first, build with --no-build-isolation)"

if skip_reason is None:
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    ext_modules.append(
        CppExtension(
            "gmt_kernels._C",
            sources,
            extra_compile_args=["-O3", "-std=c++17", "-march=x86-64-v2", "-mtune=generic", "-fno-math-errno", "-ffp-contract=off", *openmp],
            extra_link_args=openmp,
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
else:
    print(f"gmt_kernels: building without the C++ CPU backend: {skip_reason}", file=sys.stderr)

setup(
    packages=find_packages(include=["gmt_kernels", "gmt_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
