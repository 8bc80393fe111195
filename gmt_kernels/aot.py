"""Ahead-of-time compile every shipped Triton kernel specialisation for given GPU architectures.

    python -m gmt_kernels.aot --arch 80 --arch 90 [--json PATH]

Works without a GPU or driver (triton.compile with a GPUTarget, then ptxas for the resource use).
Prints per kernel variant and architecture: registers, spilled bytes, static shared memory, the
128-bit global loads and stores in the PTX (ld/st.global.v4 of 32-bit words, .v2 of 64-bit ones),
and the shared-memory instructions (ld/st/atom.shared) and barriers (bar.sync) per gradient entry:
their count in the PTX divided by the entries one loop iteration of the kernel covers (the kernels
have one loop body per access pattern, so this is what a full chunk costs, plus the program's
prologue and epilogue spread over one iteration). Exits 1 if any variant fails to compile or spills.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

# Compiling needs the real JIT front end, not the interpreter the test suite may have switched on.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning

_VECTOR_LOAD = re.compile(r"ld\.global[.\w]*\.v(\d)\.[bfsu](\d+)")
_VECTOR_STORE = re.compile(r"st\.global[.\w]*\.v(\d)\.[bfsu](\d+)")
_SHARED = {
    "ld_shared": re.compile(r"\bld(?:\.\w+)*\.shared\b"),
    "st_shared": re.compile(r"\bst(?:\.\w+)*\.shared\b"),
    "atom_shared": re.compile(r"\b(?:atom|red)(?:\.\w+)*\.shared\b"),
    "barriers": re.compile(r"\b(?:bar|barrier)\.sync\b"),
}
_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def has_128bit_loads(ptx: str) -> bool:
    return wide_accesses(ptx, _VECTOR_LOAD) > 0


def wide_accesses(ptx: str, pattern=_VECTOR_STORE) -> int:
    """128-bit global accesses (v4 x 32-bit or v2 x 64-bit) of the kind `pattern` matches, in the PTX."""
    return sum(int(n) * int(bits) == 128 for n, bits in pattern.findall(ptx))


def shared_traffic(ptx: str) -> dict:
    """Shared-memory loads, stores, atomics and barriers in the PTX (static counts)."""
    return {name: len(pattern.findall(ptx)) for name, pattern in _SHARED.items()}


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spilled bytes) as ptxas reports them for this PTX on this architecture."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", path, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        ).stderr
    registers = int(_REGISTERS.search(out).group(1))
    spills = sum(int(x) for x in _SPILLS.search(out).groups())
    return registers, spills


def compile_one(index: int, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gmt_kernels.backends.triton.specs import shipped_specs

    spec = shipped_specs()[index]
    record = {"kernel": spec.kernel, "variant": spec.label, "arch": arch}
    try:
        source = ASTSource(fn=spec.function(), signature=dict(spec.signature), constexprs=dict(spec.constexprs))
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
        registers, spills = _ptxas_usage(compiled.asm["ptx"], arch)
        ptx = compiled.asm["ptx"]
        shared = shared_traffic(ptx)
        per_entry = {f"{name}_per_entry": round(count / spec.entries_per_iteration, 4) for name, count in shared.items()}
        record.update(registers=registers, spills=spills, shared_bytes=int(compiled.metadata.shared),
                      vector_loads=has_128bit_loads(ptx), v4_loads=wide_accesses(ptx, _VECTOR_LOAD),
                      v4_stores=wide_accesses(ptx, _VECTOR_STORE), **shared, **per_entry,
                      entries_per_iteration=spec.entries_per_iteration, error=None)
    except Exception as exc:  # reported in the table and the exit status, never swallowed
        record.update(registers=None, spills=None, shared_bytes=None, vector_loads=None, v4_loads=None,
                      v4_stores=None,
                      error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
    return record


def compile_all(archs, jobs=None) -> list[dict]:
    from gmt_kernels.backends.triton.specs import shipped_specs

    work = [(i, arch) for arch in archs for i in range(len(shipped_specs()))]
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
        return list(pool.map(compile_one, *zip(*work)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gmt_kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", required=True,
                        help="CUDA compute capability as an integer (80 = A100, 90 = H100); repeat for several")
    parser.add_argument("--json", metavar="PATH", help="also write the records as a JSON list to PATH")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: all cores)")
    args = parser.parse_args(argv)
    for arch in args.arch:
        if arch < 75:
            parser.error(f"--arch {arch}: Triton compiles for compute capability 75 (Turing) and newer")

    records = compile_all(args.arch, args.jobs)
    header = (f"{'kernel':<13} {'variant':<44} {'arch':>4} {'regs':>5} {'spills':>6} {'shared':>7} "
              f"{'v4 ld':>5} {'v4 st':>5} {'ld.s/e':>7} {'st.s/e':>7} {'atom.s/e':>8} {'bar/e':>7}")
    print(header)
    print("-" * len(header))
    for r in records:
        if r["error"]:
            print(f"{r['kernel']:<13} {r['variant']:<44} {r['arch']:>4}  FAILED: {r['error']}")
        else:
            print(f"{r['kernel']:<13} {r['variant']:<44} {r['arch']:>4} {r['registers']:>5} {r['spills']:>6} "
                  f"{r['shared_bytes']:>7} {r['v4_loads']:>5} {r['v4_stores']:>5} {r['ld_shared_per_entry']:>7.4f} "
                  f"{r['st_shared_per_entry']:>7.4f} {r['atom_shared_per_entry']:>8.4f} {r['barriers_per_entry']:>7.4f}")
    print("\nv4 ld/st: 128-bit global loads/stores in the PTX; *.s/e: shared-memory instructions (per thread) "
          "and barriers per gradient entry, from the PTX's static counts over the entries of one loop iteration.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    failed = [r for r in records if r["error"] or r["spills"]]
    if failed:
        print(f"\n{len(failed)} of {len(records)} compiles failed or spilled registers.", file=sys.stderr)
        return 1
    print(f"\nall {len(records)} compiles succeeded without register spills.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
