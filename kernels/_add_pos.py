"""The last step of a token embedding after its cuBLAS projection (kernels.patch_embed,
kernels.diffuse_embed): out = projected + pos[ids], summed in fp32 and written in out's dtype.

The plain path adds a gathered copy of pos (B, n, D); here each program reads its rows' ids and
their pos rows directly (pos, (N, D), stays in L2), one read of `projected` and one write.
"""
from __future__ import annotations

import torch

from ._patches import tl, triton

BLOCK_M, BLOCK_N = 32, 128  # a copy-like pass: 32 rows x 128 features a program


def add_pos(projected: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """projected (B*n, D) + pos[ids] with ids (B, n) (any strides) -> (B, n, D) in `dtype`; in
    place where projected has that dtype (each element is read, then written, by one
    program)."""
    rows, dim = projected.shape
    assert projected.is_contiguous(), "the kernel indexes rows of D contiguous elements"
    out = projected if projected.dtype == dtype else torch.empty_like(projected, dtype=dtype)
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(dim, BLOCK_N))
    _add_pos_kernel[grid](projected, pos.contiguous(), ids, out, rows, ids.shape[1], dim,
                          *ids.stride(), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4)
    return out.view(*ids.shape, dim)


if triton is not None:
    @triton.jit
    def _add_pos_kernel(in_ptr, pos_ptr, ids_ptr, out_ptr, R, n, D, stride_ib, stride_in,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """out[r] = in[r] + pos[ids[r]] over a (BLOCK_M rows, BLOCK_N features) tile, in fp32."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < R
        mask = row_ok[:, None] & (cols < D)[None, :]
        b = rows // n
        token = tl.load(ids_ptr + b * stride_ib + (rows - b * n) * stride_in, mask=row_ok,
                        other=0)
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        value = (tl.load(in_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                 + tl.load(pos_ptr + token[:, None] * D + cols[None, :], mask=mask,
                           other=0.0).to(tl.float32))
        tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=mask)
