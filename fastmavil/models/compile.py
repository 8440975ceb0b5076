"""Regional compilation: torch.compile each transformer block rather than the whole model.

The blocks hold the step's memory-bound work (LayerNorms, GELU, residual adds, dtype casts
around the matmuls), which the compiler fuses; blocks of one kind and width share a compiled
graph (a whole-model compile at paper size did not finish within 55 s on an H200; this one
warmed up in 77 s there, BENCHMARKS.md), and the masking, the Triton kernels and the losses
stay eager (nothing to trace through).
"""
from __future__ import annotations

from torch import nn

from .attention import Block, CrossBlock
from .swin import WindowBlock

BLOCKS = (Block, CrossBlock, WindowBlock)
# train.compile_mode -> torch.compile's mode. Inductor's own CUDA graphs stay off under
# max-autotune: train.cuda_graphs captures whole passes, compiled blocks included.
MODES = {"default": "default", "max-autotune": "max-autotune-no-cudagraphs"}
# Found with torch 2.13 on a CPU: in max-autotune, a Swin block whose windows go to SDPA with the
# position bias (the kernels' fallback) compiles a backward that asserts the first shape's
# window batch, and fails at the next batch size; with the kernels' window attention it runs.
MAX_AUTOTUNE_NEEDS_KERNELS = (
    "compiling in max-autotune (train.compile_mode, bench.throughput --compile-mode) needs the "
    "Triton kernels (model.kernels on, a CUDA device): without them Inductor compiles the Swin "
    "decoder's SDPA path into a backward that fails at the second batch size (torch 2.13)")


def compile_blocks(model: nn.Module, mode: str = "default") -> int:
    """Compiles every transformer block of `model` in place, in `mode` (a key of MODES);
    returns how many.

    With dynamic shapes from the start: batch and token counts differ between the encoders and
    change with the masking curriculum, and the default (a static graph, recompiled as dynamic
    at the first new shape) compiles one graph more per block kind. With the encoders handing
    their first block a tensor that is not a view (encoder.py), a tiny R4 traces one graph per
    block variant, 4, over two batch sizes and ratios, where it traced 10 (tests/test_compile.py).
    On an H200 (R4, B = 32) the dynamic kernels took as long as static ones: 83.9 against
    84.0 ms of GPU time per step (BENCHMARKS.md, f080127).
    """
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r} is not one of: {', '.join(MODES)}")
    blocks = [m for m in model.modules() if isinstance(m, BLOCKS)]
    for block in blocks:
        block.compile(dynamic=True, mode=MODES[mode])
    return len(blocks)
