"""Attention backends at the model's own call sites: SDPA against the explicit-softmax math path.

    python -m bench.attention                     # R4; paper size on CUDA, small on a CPU
    python -m bench.attention configs/r1.toml --size base

One training forward of the config's model records every attention() call (query and key
shapes, the bias and whether it is learned); each distinct call is then timed forward +
backward (gradients of q, k, v and a learned bias): on CUDA the kernels' GPU time from the
profiler, in bf16 (the autocast dtype), with SDPA, with math, with SDPA restricted to each of
its CUDA kernels (cuDNN, flash, memory-efficient; "-" where that kernel does not take the call:
is SDPA's own pick the fastest?), with the Triton window kernels where the bias is shared by
the batch (kernels.window_attention, which `auto` runs in the Swin decoder with the kernels
on) and with the Triton sequence kernels where there is no bias (kernels.attention, backend
`triton`: q, k, v packed as the projections give them, their gradients written back so), next
to `sdpa-packed`, SDPA from the same packed projections as the modules call it (the heads'
split and merge and the gradients' reassembly included, which the kernels avoid); on a CPU
wall time in fp32, SDPA and math. Why: the Swin audio decoder's 4x4 windows
attend over 16 keys with a learned bias, which sends SDPA to its memory-efficient kernel (the
one with a bias gradient); on an H200 that took 0.64 ms per call, 5 ms of a 107 ms R4 step,
for about 13 GFLOP (bench/results/profile-NVIDIA_H200-r4-f080127-eager.txt).
Writes bench/results/attention-<device>-<size>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import warnings
from pathlib import Path

import torch

import fastmavil.models.attention as attention_module
import fastmavil.models.swin as swin_module
import kernels
from fastmavil.config import ConfigError, load_config
from fastmavil.models import build_model

from ._report import (add_results_option, config_path, device_name, environment,
                      file_slug, gpu_time_ms, positive_int, print_table, wall_times_ms,
                      write_json)

BACKENDS = ("sdpa", "math")
# SDPA restricted to one of its kernels (CUDA): "sdpa:<name>" runs under sdpa_kernel(<kernel>)
SDPA_KERNELS = ("cudnn", "flash", "efficient")


@contextlib.contextmanager
def recorded_calls():
    """Yields a Counter-like dict {call site: calls} filled by every attention() call made
    inside, through both modules that call it."""
    calls, real = {}, attention_module.attention

    def recording(q, k, v, bias=None, backend="auto"):
        site = (tuple(q.shape), tuple(k.shape),
                None if bias is None else (tuple(bias.shape), bias.requires_grad))
        calls[site] = calls.get(site, 0) + 1
        return real(q, k, v, bias, backend)
    try:
        attention_module.attention = swin_module.attention = recording
        yield calls
    finally:
        attention_module.attention = swin_module.attention = real


def call_sites(cfg, device: torch.device, batch: int) -> dict:
    """{(q shape, k shape, bias): calls per training forward} of one forward at the config's
    final masking ratio."""
    with device:
        model = build_model(cfg)
    model.to(device)
    m = cfg.model
    audio = torch.randn(batch, 1, m.audio_frames, m.mel_bins, device=device)
    video = (torch.randn(batch, 3, m.video_frames, m.video_size, m.video_size, device=device)
             if m.has_video else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())  # as training runs it (and half the memory)
    with recorded_calls() as calls, autocast:  # autograd on: a learned bias records as learned
        model(audio, video, cfg.mask.end, torch.Generator(device).manual_seed(0))
    return calls


def time_site(site, backend: str, device: torch.device, dtype: torch.dtype,
              reps: int) -> float | None:
    """Milliseconds for one call's forward + backward: GPU time on CUDA, wall time on a CPU."""
    q_shape, k_shape, bias = site
    gen = torch.Generator(device).manual_seed(0)
    q = torch.randn(q_shape, device=device, dtype=dtype, generator=gen, requires_grad=True)
    k, v = (torch.randn(k_shape, device=device, dtype=dtype, generator=gen, requires_grad=True)
            for _ in range(2))
    inputs = [q, k, v]
    b = None
    if bias is not None:  # fp32, as the model's position bias; attention() casts it
        b = torch.randn(bias[0], device=device, generator=gen, requires_grad=bias[1])
        inputs += [b] if bias[1] else []

    backend, _, kernel = backend.partition(":")
    if backend in ("triton", "sdpa-packed"):  # from the packed projections, as modules call them
        if b is not None or (backend == "triton" and not kernels.can_launch("attention", q)):
            return None
        return _time_packed(q_shape, k_shape, device, dtype, reps, backend == "triton")
    if backend == "window":  # the Swin windows' Triton kernels (kernels.window_attention)
        from kernels.window_attention import window_attention
        if (b is None or b.dim() != 3 or q_shape != k_shape
                or not kernels.can_launch("window_attention", q, k, v, b)):
            return None
        attend = window_attention
    else:
        def attend(q, k, v, b):
            with sdpa_kernel(kernel) if kernel else contextlib.nullcontext():
                return attention_module.attention(q, k, v, b, backend)

    def step():
        out = attend(q, k, v, b)
        torch.autograd.grad(out, inputs, torch.ones_like(out))
    try:
        if device.type == "cuda":
            return gpu_time_ms(step, reps)[0]
        return statistics.median(wall_times_ms(step, reps))
    except RuntimeError as err:  # a forced kernel that does not take these inputs
        if not kernel:
            raise
        print(f"sdpa:{kernel} at {describe(site)}: {str(err).strip().splitlines()[0]}")
        return None


def _time_packed(q_shape, k_shape, device: torch.device, dtype: torch.dtype, reps: int,
                 packed_kernels: bool) -> float:
    """Attention at a site from the packed projections (B, L, heads * d), as the modules call
    it: the kernels of kernels.attention (packed_kernels), or the modules' other path, heads
    split, SDPA and heads merged, whose copies (and the gradients' reassembly into the
    packed layout) the kernels avoid. Self-attention on one packed qkv where queries and keys
    have one shape (a cross-attention site of equal lengths is timed so too: the same work),
    else cross-attention on q and a packed kv."""
    from kernels.attention import cross_attention, self_attention
    batch, heads, lq, head_dim = q_shape
    gen = torch.Generator(device).manual_seed(0)

    def packed(length, parts):
        return torch.randn(batch, length, parts * heads * head_dim, device=device, dtype=dtype,
                           generator=gen, requires_grad=True)

    def sdpa(q, k, v):
        return attention_module.heads_attention(q, k, v, heads, backend="sdpa")
    if q_shape == k_shape:
        inputs = [packed(lq, 3)]
        attend = ((lambda: self_attention(*inputs, heads)) if packed_kernels
                  else lambda: sdpa(*inputs[0].chunk(3, dim=-1)))
    else:
        inputs = [packed(lq, 1), packed(k_shape[2], 2)]
        attend = ((lambda: cross_attention(*inputs, heads)) if packed_kernels
                  else lambda: sdpa(inputs[0], *inputs[1].chunk(2, dim=-1)))

    def step():
        out = attend()
        torch.autograd.grad(out, inputs, torch.ones_like(out))
    if device.type == "cuda":
        return gpu_time_ms(step, reps)[0]
    return statistics.median(wall_times_ms(step, reps))


def sdpa_kernel(name: str) -> contextlib.ExitStack:
    """A fresh context (sdpa_kernel's can be entered once) restricting SDPA to one of its CUDA
    kernels, its warnings silenced: why a kernel declines is printed by time_site."""
    from torch.nn.attention import SDPBackend, sdpa_kernel as restrict
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore", UserWarning)
    stack.enter_context(restrict([{"cudnn": SDPBackend.CUDNN_ATTENTION,
                                   "flash": SDPBackend.FLASH_ATTENTION,
                                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]]))
    return stack


def describe(site) -> str:
    q, k, bias = site
    text = f"q {'x'.join(map(str, q))} k {'x'.join(map(str, k[2:]))}"
    return text + ("" if bias is None else
                   f" bias {'x'.join(map(str, bias[0]))}{' learned' if bias[1] else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/r4.toml")
    parser.add_argument("--size", choices=["tiny", "small", "base"], default=None,
                        help="model size (default: base on CUDA, small on a CPU)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="default 32 CUDA, 8 CPU")
    parser.add_argument("--reps", type=positive_int, default=None,
                        help="default 20 CUDA, 3 CPU")
    parser.add_argument("--sdpa-kernels", nargs="*", choices=SDPA_KERNELS, default=None,
                        help="SDPA kernels to time on their own besides SDPA's choice "
                        "(default: all three on CUDA, none on a CPU)")
    add_results_option(parser)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or ("base" if cuda else "small")
    batch = args.batch or (32 if cuda else 8)
    reps = args.reps or (20 if cuda else 3)
    dtype = torch.bfloat16 if cuda else torch.float32
    forced = SDPA_KERNELS if args.sdpa_kernels is None and cuda else args.sdpa_kernels or ()
    # the Triton window kernels where they apply (a bias shared by the batch: Swin windows) and
    # the sequence kernels where there is no bias, beside SDPA called as the modules call it
    # from the same packed projections; on CUDA only (the interpreter is slow)
    backends = (*BACKENDS, *(f"sdpa:{k}" for k in forced),
                *(("window", "sdpa-packed", "triton") if cuda else ()))
    path = Path(args.config)
    try:
        cfg = load_config(config_path(args.config), {"model.size": size})
    except ConfigError as err:
        parser.error(str(err))
    sites = call_sites(cfg, device, batch)
    rows, records, totals = [], [], dict.fromkeys(backends, 0.0)
    for site, calls in sites.items():
        ms = {backend: time_site(site, backend, device, dtype, reps) for backend in backends}
        for backend in backends:  # a backend that cannot take every call has no total
            totals[backend] = (None if ms[backend] is None or totals[backend] is None
                               else totals[backend] + ms[backend] * calls)
        ratio = ms["sdpa"] / ms["math"] if ms["sdpa"] and ms["math"] else None
        fastest = min((b for b in backends if ms[b] is not None), key=ms.get)
        records.append({"site": describe(site), "calls": calls,
                        **{f"{b}_ms": ms[b] for b in backends}, "sdpa_over_math": ratio,
                        "fastest": fastest})
        rows.append([describe(site), str(calls),
                     *("-" if ms[b] is None else f"{ms[b]:.3f}" for b in backends),
                     "-" if ratio is None else f"{ratio:.2f}", fastest])
    what = "GPU ms (profiler)" if cuda else "wall ms"
    name = device_name(device)
    print_table(f"{path.stem} attention calls per forward, {size}, B={batch}, {name}: "
                f"forward + backward {what} per call",
                ["call site", "calls", *backends, "sdpa / math", "fastest"], rows)
    print("per forward + backward, all calls: " + ", ".join(
        f"{b} {'-' if totals[b] is None else f'{totals[b]:.2f}'} ms" for b in backends))
    args.results.mkdir(parents=True, exist_ok=True)
    # R4's record keeps its name; another config's, or another batch's, gets its own
    suffix = "".join(part for part, on in ((f"-{path.stem}", path.stem != "r4"),
                                           (f"-b{batch}", args.batch is not None)) if on)
    out = args.results / f"attention-{file_slug(name)}-{size}{suffix}.json"
    write_json(out, {"bench": "attention", **environment(device), "config": str(args.config),
                     "size": size, "batch": batch, "dtype": str(dtype), "timing": what,
                     "sites": records, "total_ms": totals})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
