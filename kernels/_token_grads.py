"""The bias and position gradients of a token embedding, in one pass over its output gradient.

    out[b, i] = W a[b, i] + bias + pos[ids[b, i]]   (B, n, D)  =>
    grad_bias = sum_{b, i} g[b, i]        grad_pos[t] = sum_{b, i : ids[b, i] = t} g[b, i]

and, in the same pass, g in the dtype of the weight-gradient matmul (grad_W = g^T a) when it
differs (fp32 g under bf16 autocast). The plain way reads g once per product (a cast, a sum, a
float copy for index_add_) and scatters with float atomics, whose order, and so whose rounding,
changes from run to run; for the diffusion input every position row receives ~0.8 B of them.

Here each program owns a tile of tokens x features and gathers: for each sample, the row i whose
ids[b, i] is each of its tokens, summed in a fixed order in fp32 and written once in pos's dtype.
No atomics on floats: the result is deterministic when a sample's ids are distinct (a mask's
always are) for a given config; all candidates sum 8 samples per step, but their warps and
feature blocks differ, so the autotuner's pick may change the last bit between processes, as
cuBLAS's choice of algorithm does. (Training never takes this path: its positions are fixed.)
In forward, when pos needs a gradient, `link_tokens` links the rows to their tokens:

    head[b, t] = 1 + the row i last linked with ids[b, i] = t, 0 if none   (B, N) int32
    next[b, i] = 1 + the row linked before i with the same token, 0 if none (B, n) int32

so repeated ids in a sample are summed too (a chain per token, walked only where one exists; the
atomic exchange decides their order). Linking is its own small kernel, not a step of the
autotuned forward kernels: the autotuner launches a kernel many times on the same arguments, and
a second link of a row would link it to itself. grad_bias comes from the same tiles: each
program stores its tile's column sums, and the last program of a feature block to finish (an
integer arrival counter says which) adds them in tile order and writes grad_bias: deterministic,
and no reduction launched after (on an H200 torch's sum of the partials and its cast to the
bias dtype took 5.7 of the audio embedding backward's 25 us). Without a position gradient a
row-tiled pass does the same for the bias and casts g.
"""
from __future__ import annotations

import torch

import kernels

from ._patches import tl, triton

# Token tiles of 16: partial bias sums have one row per tile, so every config shares it; so do
# the 8 samples summed per step (the order of the sums). The interpreter runs one config with a
# wide feature block (it pays per operation, not per element).
BLOCK_T, BLOCK_B = 16, 8
_INTERPRET = dict(BLOCK_D=64, UNROLL=True)
_ROWS = dict(BLOCK_R=64, BLOCK_D=64)
# Unrolled gather candidates up to this many steps of BLOCK_B samples (B <= 64): at B = 256 each
# compiled for 8-10 s on sm_90 and spilled up to 1.6 KB a thread.
_MAX_UNROLLED_STEPS = 8


def _counters(count: int, device: torch.device) -> torch.Tensor:
    """Zeroed arrival counters for the last-program bias sum (a function so tests can share)."""
    return torch.zeros(count, dtype=torch.int32, device=device)


def _bias_args(tiles: int, dim: int, grad_bias: torch.Tensor | None, g: torch.Tensor) -> tuple:
    """(partial (tiles, D) fp32, counters, grad_bias) for a kernel that sums the bias; without
    one, g in their place (BIAS=False: never read)."""
    if grad_bias is None:
        return g, g, g
    partial = torch.empty(tiles, dim, device=g.device, dtype=torch.float32)
    # one arrival counter per feature block of the narrowest grid any launch uses
    return partial, _counters(triton.cdiv(dim, _MIN_BLOCK_D), g.device), grad_bias


def link_tokens(ids: torch.Tensor, num_tokens: int) -> tuple:
    """(head (B, N), next (B, n)) int32 of ids (B, n) (any strides): see the module docstring.
    Ids outside [0, N) are left unlinked rather than written out of bounds."""
    batch, n = ids.shape
    head = torch.zeros(batch, num_tokens, dtype=torch.int32, device=ids.device)
    nxt = torch.empty(batch, n, dtype=torch.int32, device=ids.device)
    block = 1024 if kernels.interpreting() else 256
    _link_kernel[(triton.cdiv(batch * n, block),)](ids, head, nxt, batch * n, n, num_tokens,
                                                   *ids.stride(), BLOCK=block)
    return head, nxt


def embedding_grads(grad_out: torch.Tensor, *, links: tuple | None,
                    bias_dtype: torch.dtype | None, pos_dtype: torch.dtype | None,
                    matmul_dtype: torch.dtype | None) -> tuple:
    """(g for the weight gradient (B*n, D) or None, grad_bias or None, grad_pos or None).

    grad_out (B, n, D). Each gradient is computed when its dtype is given: bias_dtype and
    pos_dtype are the parameters'; matmul_dtype is the dtype the weight-gradient matmul takes g
    in. grad_pos needs the forward's `link_tokens(ids, N)` as links.
    """
    batch, n, dim = grad_out.shape
    g = grad_out.contiguous()
    cast = matmul_dtype is not None and matmul_dtype != g.dtype
    bias = bias_dtype is not None
    # The gather writes the rows it reaches; a row whose id is outside [0, N) (invalid input,
    # unchecked) has no token and would keep uninitialised memory: zeros, on that path only.
    new = torch.zeros if pos_dtype is not None else torch.empty
    g_mm = new(batch * n, dim, device=g.device, dtype=matmul_dtype) if cast else None
    grad_bias = torch.empty(dim, device=g.device, dtype=bias_dtype) if bias else None
    grad_pos = None
    if pos_dtype is not None:
        head, nxt = links
        num_tokens = head.shape[1]
        grad_pos = torch.empty(num_tokens, dim, device=g.device, dtype=pos_dtype)
        tiles = triton.cdiv(num_tokens, BLOCK_T)
        args = (g, head, nxt, grad_pos, *_bias_args(tiles, dim, grad_bias, g),
                g if g_mm is None else g_mm, batch, n, num_tokens, dim, tiles)
        blocks = dict(CAST=cast, BIAS=bias, BLOCK_B=BLOCK_B, BLOCK_T=BLOCK_T,
                      STEPS=triton.cdiv(batch, BLOCK_B))
        kernels.launch(_gather_tuned, lambda meta: (tiles, triton.cdiv(dim, meta["BLOCK_D"])),
                       _INTERPRET, *args, **blocks)
    elif (cast or bias) and batch * n == 0:  # no rows: no program would write grad_bias
        if bias:
            grad_bias.zero_()
    elif cast or bias:
        rows = batch * n
        tiles = triton.cdiv(rows, _ROWS["BLOCK_R"])
        _rows_kernel[(tiles, triton.cdiv(dim, _ROWS["BLOCK_D"]))](
            g, *_bias_args(tiles, dim, grad_bias, g), g if g_mm is None else g_mm, rows, dim,
            tiles, CAST=cast, BIAS=bias, **_ROWS, num_warps=4)
    if matmul_dtype is not None and g_mm is None:
        g_mm = g.flatten(0, 1)
    return g_mm, grad_bias, grad_pos


def embedding_backward(grad_out: torch.Tensor, rows: torch.Tensor | None, links: list,
                       meta: tuple, needs: tuple[bool, bool, bool]) -> tuple:
    """(grad_weight, grad_bias, grad_pos), each None where not needed, of an embedding
    out = rows W^T + bias + pos[ids] (kernels.patch_embed, kernels.diffuse_embed).

    rows (B*n, P): what the forward multiplied, saved in the compute dtype (None when W needs no
    gradient); the weight gradient multiplies in that dtype, as F.linear's under autocast.
    links: the forward's link_tokens (for grad_pos). meta: (weight shape, weight dtype, bias
    dtype, pos dtype). needs: ctx.needs_input_grad of (weight, bias, pos)."""
    w_shape, w_dtype, bias_dtype, pos_dtype = meta
    need_w, need_b, need_pos = needs
    g, grad_b, grad_pos = embedding_grads(
        grad_out, links=links, bias_dtype=bias_dtype if need_b else None,
        pos_dtype=pos_dtype if need_pos else None, matmul_dtype=rows.dtype if need_w else None)
    grad_w = weight_grad(g, rows, w_shape, w_dtype) if need_w else None
    return grad_w, grad_b, grad_pos


# torch.mm(..., out_dtype=) (CUDA, torch >= 2.8): half inputs, an fp32 result.
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def weight_grad(g: torch.Tensor, a: torch.Tensor, shape: torch.Size,
                dtype: torch.dtype) -> torch.Tensor:
    """grad_W = g^T a (D, P) in `dtype`, reshaped to the weight's shape; a half-precision product
    is written in fp32 straight from its fp32 accumulator on CUDA (no rounding to the half dtype
    and no cast kernel) where torch.mm has out_dtype."""
    if (_MM_OUT_DTYPE and g.is_cuda and dtype == torch.float32
            and g.dtype in (torch.bfloat16, torch.float16)):
        return torch.mm(g.t(), a, out_dtype=torch.float32).view(shape)
    return torch.mm(g.t(), a).to(dtype).view(shape)


if triton is not None:
    @triton.jit
    def _link_kernel(ids_ptr, head_ptr, next_ptr, R, n, N, stride_b, stride_i,
                     BLOCK: tl.constexpr):
        """Links BLOCK of the B*n rows: head[b, t] takes the row, next[b, i] the one before."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        b = rows // n
        i = rows - b * n
        ok = rows < R
        token = tl.load(ids_ptr + b * stride_b + i * stride_i, mask=ok, other=0).to(tl.int32)
        ok &= (token >= 0) & (token < N)
        prev = tl.atomic_xchg(head_ptr + b * N + token, i + 1, mask=ok)
        tl.store(next_ptr + rows, tl.where(ok, prev, 0), mask=rows < R)

    @triton.jit
    def _gather_kernel(g_ptr, head_ptr, next_ptr, gpos_ptr, partial_ptr, counter_ptr, gbias_ptr,
                       gmm_ptr, B, n, N, D, tiles, CAST: tl.constexpr, BIAS: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, STEPS: tl.constexpr,
                       BLOCK_D: tl.constexpr, UNROLL: tl.constexpr):
        """grad_pos for BLOCK_T tokens x BLOCK_D features, summing BLOCK_B samples at a time
        (STEPS = cdiv(B, BLOCK_B) steps); with BIAS, the tile's column sums go to partial[tile]
        and the block's last program writes grad_bias."""
        toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        tok_ok, col_ok = toks < N, cols < D
        acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        chained = tl.zeros((BLOCK_T,), tl.int32)  # > 0: a row here has an earlier same-token row
        if UNROLL:
            # Straight-line code: every step's head and row loads are independent of the sums
            # before them, so they may all be in flight at once (the same sums, in the same
            # order, as the loop below).
            for step in tl.static_range(STEPS):
                h = _heads(head_ptr, step * BLOCK_B, B, N, toks, tok_ok, BLOCK_B)
                row = (step * BLOCK_B + tl.arange(0, BLOCK_B))[:, None].to(tl.int64) * n + h - 1
                acc += _add_rows(g_ptr, gmm_ptr, row, h > 0, cols, col_ok, D, CAST)
                chained = tl.maximum(chained, tl.max(tl.load(next_ptr + row, mask=h > 0,
                                                             other=0), 0))
        else:
            h_next = _heads(head_ptr, 0, B, N, toks, tok_ok, BLOCK_B)
            for b0 in range(0, B, BLOCK_B):
                # The next samples' heads load while this step's rows do: one memory latency per
                # step rather than two in a row.
                h = h_next
                h_next = _heads(head_ptr, b0 + BLOCK_B, B, N, toks, tok_ok, BLOCK_B)
                row = (b0 + tl.arange(0, BLOCK_B))[:, None].to(tl.int64) * n + h - 1
                acc += _add_rows(g_ptr, gmm_ptr, row, h > 0, cols, col_ok, D, CAST)
                chained = tl.maximum(chained, tl.max(tl.load(next_ptr + row, mask=h > 0,
                                                             other=0), 0))
        if tl.max(chained, axis=0) > 0:  # repeated ids: walk the rest of each chain
            for b in range(0, B):
                first = tl.load(head_ptr + b * N + toks, mask=tok_ok, other=0)
                r = tl.load(next_ptr + b * n + first - 1, mask=first > 0, other=0)
                while tl.max(r, axis=0) > 0:
                    link = (b * n + r - 1).to(tl.int64)
                    acc += _add_rows(g_ptr, gmm_ptr, link[None, :], (r > 0)[None, :], cols,
                                     col_ok, D, CAST)
                    r = tl.load(next_ptr + link, mask=r > 0, other=0)
        tl.store(gpos_ptr + toks[:, None] * D + cols[None, :],
                 acc.to(gpos_ptr.dtype.element_ty), mask=tok_ok[:, None] & col_ok[None, :])
        if BIAS:
            tl.store(partial_ptr + tl.program_id(0) * D + cols, tl.sum(acc, axis=0), mask=col_ok)
            _finish_bias(partial_ptr, counter_ptr, gbias_ptr, tiles, D, cols, col_ok, BLOCK_D)

    @triton.jit
    def _finish_bias(partial_ptr, counter_ptr, gbias_ptr, tiles, D, cols, col_ok,
                     BLOCK_D: tl.constexpr):
        """Called by each of a feature block's `tiles` programs once it has stored its partial
        column sums: the last to arrive adds partial[:, cols] in tile order (the same order on
        every run) into grad_bias, then zeroes the block's counter, so that a launch leaves the
        counters as it found them (the autotuner relaunches on the same arguments)."""
        tl.debug_barrier()  # every thread's partial stored before the release below
        counter = counter_ptr + tl.program_id(1)
        if tl.atomic_add(counter, 1, sem="acq_rel") == tiles - 1:
            acc = tl.zeros((BLOCK_D,), tl.float32)
            for t0 in range(0, tiles, 32):
                ts = t0 + tl.arange(0, 32)
                # .cg: read at L2, where the other programs' stores are, never a stale L1 line
                part = tl.load(partial_ptr + ts[:, None] * D + cols[None, :],
                               mask=(ts < tiles)[:, None] & col_ok[None, :], other=0.0,
                               cache_modifier=".cg")
                acc += tl.sum(part, axis=0)
            tl.store(gbias_ptr + cols, acc.to(gbias_ptr.dtype.element_ty), mask=col_ok)
            tl.atomic_xchg(counter, 0)

    @triton.jit
    def _heads(head_ptr, b0, B, N, toks, tok_ok, BLOCK_B: tl.constexpr):
        """head[b0 : b0 + BLOCK_B, toks] (BLOCK_B, BLOCK_T), 0 past the last sample."""
        bs = b0 + tl.arange(0, BLOCK_B)
        return tl.load(head_ptr + bs[:, None] * N + toks[None, :],
                       mask=(bs < B)[:, None] & tok_ok[None, :], other=0)

    @triton.jit
    def _add_rows(g_ptr, gmm_ptr, row, live, cols, col_ok, D, CAST: tl.constexpr):
        """sum over axis 0 of the rows g[row] (S, T) at cols -> (T, BLOCK_D) fp32, 0 where not
        live; with CAST also copies them to gmm in its dtype."""
        offs = row[:, :, None] * D + cols[None, None, :]
        mask = live[:, :, None] & col_ok[None, None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        if CAST:
            tl.store(gmm_ptr + offs, g.to(gmm_ptr.dtype.element_ty), mask=mask)
        return tl.sum(g.to(tl.float32), axis=0)

    @triton.jit
    def _rows_kernel(g_ptr, partial_ptr, counter_ptr, gbias_ptr, gmm_ptr, R, D, tiles,
                     CAST: tl.constexpr, BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        """BLOCK_R rows of g: with CAST copied to gmm in its dtype; with BIAS their column sums
        to partial[tile], and the feature block's last program writes grad_bias."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        mask = (rows < R)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        if CAST:
            tl.store(gmm_ptr + offs, g.to(gmm_ptr.dtype.element_ty), mask=mask)
        if BIAS:
            tl.store(partial_ptr + tl.program_id(0) * D + cols, tl.sum(g.to(tl.float32), axis=0),
                     mask=col_ok)
            _finish_bias(partial_ptr, counter_ptr, gbias_ptr, tiles, D, cols, col_ok, BLOCK_D)

    def _prune_unrolled(configs: list, named_args: dict, **kwargs) -> list:
        """The autotuner's candidates for this call: unrolled ones only up to
        _MAX_UNROLLED_STEPS steps of samples."""
        if kwargs["STEPS"] <= _MAX_UNROLLED_STEPS:
            return configs
        return [c for c in configs if not c.kwargs["UNROLL"]]

    # H100 candidates: feature block x warps, each as a loop over the samples and unrolled. Each
    # gathered row segment is BLOCK_D elements, and BLOCK_B x BLOCK_T independent gathers are in
    # flight per step. (Triton pipelines no loop without a dot unless told to: the loop's
    # prefetch of the next heads is written out instead.) Unrolled, more steps' loads may be in
    # flight, at the cost of registers: the autotuner weighs the two (on an H200 it picked an
    # unrolled one, 32 features and 4 warps, at every shape of bench.kernels; a56a753).
    _gather_tuned = triton.autotune(
        [triton.Config(dict(BLOCK_D=bd, UNROLL=u), num_warps=w)
         for bd, w in ((32, 4), (64, 4), (64, 8)) for u in (False, True)],
        key=["B", "n", "N", "D", "CAST", "BIAS"],
        prune_configs_by={"early_config_prune": _prune_unrolled})(_gather_kernel)
    # the narrowest feature block of any launch (_bias_args sizes the counters by it)
    _MIN_BLOCK_D = min([c.kwargs["BLOCK_D"] for c in _gather_tuned.configs]
                       + [_ROWS["BLOCK_D"], _INTERPRET["BLOCK_D"]])
