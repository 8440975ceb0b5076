"""kernels.compile_check: every kernel variant of the CUDA path compiles for sm_90 (H100/H200)
and fits its shared memory, checked on the CPU by Triton's NVIDIA backend and bundled ptxas.

One run in the training setting (amp, audio and video) with a deliberately tiny shared-memory
limit, so that the run shows both directions: candidates over the limit are marked, launches
that none fits fail the command, and the shared memory every variant reported fits the real
sm_90 limit. Every row also carries ptxas's registers and spills.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY_LIMIT = 1024  # bytes: the matmul kernels need far more, the loss kernels under 100


def _nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90)
    except Exception:  # noqa: BLE001 -- no triton, no NVIDIA backend or no ptxas binary
        return False
    return True


@pytest.mark.skipif(not _nvidia_backend(),
                    reason="needs Triton's NVIDIA backend and its bundled ptxas (no GPU needed)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the CUDA tests compile and "
                    "run every variant natively, so this CPU-side check would only cost its time")
def test_every_variant_compiles_for_sm90_and_fits_its_shared_memory():
    from bench._report import project_kernels
    from kernels.compile_check import SHARED_LIMIT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    run = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--arch", "90", "--settings", "amp",
         "--shared-limit", str(TINY_LIMIT)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    rows = re.findall(r"^(ok  |over) (\w+) +(amp \w+|any) .* regs \d+ spills \d+/\d+ +"
                      r"shared +(\d+) B$", out, re.M)
    # every Triton kernel in kernels/ (the launched ones: named *_kernel) is compiled: a new
    # kernel that compile_check does not run fails here
    launched = {name for name in project_kernels() if name.endswith("_kernel")}
    assert launched == {"_patch_gather_kernel", "_diffuse_kernel", "_add_pos_kernel",
                        "_mse_fwd_kernel", "_mse_bwd_kernel", "_philox_kernel", "_link_kernel",
                        "_gather_kernel", "_rows_kernel", "_window_forward_kernel",
                        "_window_backward_kernel", "_attention_forward_kernel",
                        "_attention_dq_kernel", "_attention_dkdv_kernel"}
    assert {name for _, name, _, _ in rows} == launched, out
    assert {label for _, _, label, _ in rows} == {"amp audio", "amp video", "amp window",
                                                  "amp attention", "any"}, out
    assert all((status == "over") == (int(shared) > TINY_LIMIT)
               for status, _, _, shared in rows), out
    summary = re.search(r"^(\d+) variants compiled for sm_90 in \d+ s: (\d+) over the "
                        r"shared-memory limit .*, (\d+) launches that no candidate fits, (\d+) "
                        r"compile errors$", out, re.M)
    assert summary and int(summary[1]) == len(rows) and int(summary[4]) == 0, out
    assert int(summary[2]) == sum(status == "over" for status, *_ in rows), out
    # the window and sequence attention's kernels, the position-gradient linking and gather, the
    # + pos pass in amp and the seeded diffusion and noise kernels (their four-way interleave of
    # Philox outputs goes through shared memory) fit no candidate into 1 KB; the patch gather,
    # the loss kernels, the bias pass and the diffusion with given noise do
    unfit = re.findall(r"^FAIL (\w+) +(amp \w+|any) .* no candidate fits 1024 B", out, re.M)
    assert set(unfit) == {("_diffuse_kernel", "amp audio"), ("_diffuse_kernel", "amp video"),
                          ("_add_pos_kernel", "amp audio"), ("_add_pos_kernel", "amp video"),
                          ("_gather_kernel", "amp audio"), ("_gather_kernel", "amp video"),
                          ("_link_kernel", "amp audio"), ("_link_kernel", "amp video"),
                          ("_window_forward_kernel", "amp window"),
                          ("_window_backward_kernel", "amp window"),
                          ("_attention_forward_kernel", "amp attention"),
                          ("_attention_dq_kernel", "amp attention"),
                          ("_attention_dkdv_kernel", "amp attention"),
                          ("_philox_kernel", "any")}, out
    assert int(summary[3]) == len(unfit) and run.returncode == 1, out
    assert max(int(shared) for *_, shared in rows) <= SHARED_LIMIT[90], out


def test_a_candidate_too_large_for_the_gpu_skips_in_the_per_candidate_tests():
    pytest.importorskip("triton", reason="the helper wraps Triton's OutOfResources")
    from triton.runtime.errors import OutOfResources

    from conftest import fits_this_gpu
    with pytest.raises(pytest.skip.Exception, match="Required: 300000, Hardware limit: 232448"):
        with fits_this_gpu():
            raise OutOfResources(300000, 232448, "shared memory")
    with pytest.raises(ValueError), fits_this_gpu():  # anything else still fails
        raise ValueError("a wrong result")
