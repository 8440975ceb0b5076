"""Attention backends at the model's own call sites: SDPA against the explicit-softmax math path.

    python -m bench.attention                     # R4; paper size on CUDA, small on a CPU
    python -m bench.attention configs/r1.toml --size base

One training forward of the config's model records every attention() call (query and key
shapes, the bias and whether it is learned); each distinct call is then timed forward +
backward (gradients of q, k, v and a learned bias) with both backends: on CUDA the kernels' GPU
time from the profiler, in bf16 (the autocast dtype), on a CPU wall time in fp32. Why: the Swin
audio decoder's 4x4 windows attend over 16 keys with a learned bias, which sends SDPA to its
memory-efficient kernel (the one with a bias gradient); on an H200 that took 0.64 ms per call,
5 ms of a 107 ms R4 step, for about 13 GFLOP (bench/results/profile-NVIDIA_H200-r4-f080127-
eager.txt). Whether the math path does better there decides `model.attention = auto`'s choice
for short windows. Writes bench/results/attention-<device>-<size>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

import torch

import fastmavil.models.attention as attention_module
import fastmavil.models.swin as swin_module
from fastmavil.config import load_config
from fastmavil.models import build_model

from ._report import RESULTS, commit, device_name, gpu_time_ms, print_table, wall_times_ms

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("sdpa", "math")


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

    def step():
        out = attention_module.attention(q, k, v, b, backend)
        torch.autograd.grad(out, inputs, torch.ones_like(out))
    if device.type == "cuda":
        return gpu_time_ms(step, reps)[0]
    return statistics.median(wall_times_ms(step, reps))


def describe(site) -> str:
    q, k, bias = site
    text = f"q {'x'.join(map(str, q))} k {'x'.join(map(str, k[2:]))}"
    return text + ("" if bias is None else
                   f" bias {'x'.join(map(str, bias[0]))}{' learned' if bias[1] else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__)
    parser.add_argument("config", nargs="?", default="configs/r4.toml")
    parser.add_argument("--size", choices=["tiny", "small", "base"], default=None,
                        help="model size (default: base on CUDA, small on a CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default 32 CUDA, 8 CPU")
    parser.add_argument("--reps", type=int, default=None, help="default 20 CUDA, 3 CPU")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or ("base" if cuda else "small")
    batch = args.batch or (32 if cuda else 8)
    reps = args.reps or (20 if cuda else 3)
    dtype = torch.bfloat16 if cuda else torch.float32
    path = Path(args.config)
    cfg = load_config(path if path.exists() else ROOT / path, {"model.size": size})
    sites = call_sites(cfg, device, batch)
    rows, records, totals = [], [], dict.fromkeys(BACKENDS, 0.0)
    for site, calls in sites.items():
        ms = {backend: time_site(site, backend, device, dtype, reps) for backend in BACKENDS}
        for backend in BACKENDS:
            totals[backend] += (ms[backend] or 0.0) * calls
        ratio = ms["sdpa"] / ms["math"] if ms["sdpa"] and ms["math"] else None
        records.append({"site": describe(site), "calls": calls, **{f"{b}_ms": ms[b]
                                                                   for b in BACKENDS},
                        "sdpa_over_math": ratio})
        rows.append([describe(site), str(calls),
                     *("-" if ms[b] is None else f"{ms[b]:.3f}" for b in BACKENDS),
                     "-" if ratio is None else f"{ratio:.2f}"])
    what = "GPU ms (profiler)" if cuda else "wall ms"
    name = device_name(device)
    print_table(f"{path.stem} attention calls per forward, {size}, B={batch}, {name}: "
                f"forward + backward {what} per call", ["call site", "calls", "sdpa", "math",
                                                        "sdpa / math"], rows)
    print("per forward + backward, all calls: " + ", ".join(f"{b} {totals[b]:.2f} ms"
                                                            for b in BACKENDS))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"attention-{name.replace(' ', '_').replace('/', '_')}-{size}.json"
    out.write_text(json.dumps({
        "bench": "attention", "config": str(args.config), "size": size, "batch": batch,
        "device": name, "dtype": str(dtype), "timing": what, "torch": torch.__version__,
        "commit": commit(), "sites": records, "total_ms": totals}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
