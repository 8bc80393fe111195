"""`python -m gmt_kernels.aot`: every shipped Triton specialisation compiles for sm_80 and sm_90
without a GPU, spills no registers, full-chunk loads of aligned tensors are 128 bits wide, and so
are the stores of every aligned update (mask_mode and grad_scale are compile-time constants)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_aot_compiles_every_kernel_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the tool needs the real compiler
    run = subprocess.run([sys.executable, "-m", "gmt_kernels.aot", "--arch", "80", "--arch", "90", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    records = json.loads(out.read_text())

    code = "from gmt_kernels.backends.triton.specs import shipped_specs; print(len(shipped_specs()))"
    shipped = int(subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                                 check=True).stdout)
    assert len(records) == 2 * shipped
    assert {r["kernel"] for r in records} == {"histogram", "masked_adamw"}
    for r in records:
        assert set(r) >= {"kernel", "arch", "registers", "spills", "shared_bytes", "vector_loads", "v4_loads",
                          "v4_stores", "ld_shared_per_entry", "st_shared_per_entry", "atom_shared_per_entry",
                          "barriers_per_entry"}
        assert r["error"] is None and r["spills"] == 0, r
        assert 0 < r["registers"] <= 255
        aligned = r["variant"].endswith(",aligned")
        # Aligned variants must use 128-bit global loads; unaligned ones cannot.
        assert r["vector_loads"] == aligned and (r["v4_loads"] > 0) == aligned, r
        if r["kernel"] == "masked_adamw":
            # Every aligned update stores p, m, v (and max_v) 128 bits at a time, in both mask modes:
            # at least one 128-bit store per tensor written in a full chunk's loop body.
            written = 4 if ",amsgrad," in r["variant"] else 3
            assert (r["v4_stores"] >= written) == aligned, r
        else:
            assert r["v4_stores"] == 0  # the histogram writes nothing but its atomics
    # The table on stdout names every record.
    assert run.stdout.count("masked_adamw") == sum(r["kernel"] == "masked_adamw" for r in records)


def test_aot_fails_loudly_on_a_bad_arch():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "gmt_kernels.aot", "--arch", "60"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "compute capability 75" in run.stderr
