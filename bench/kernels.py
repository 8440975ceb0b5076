"""Times each fused kernel against its PyTorch reference at paper sizes.

    python -m bench.kernels                  # all kernels, audio and video, rho 0.8 and 0.9

Shapes: audio B=32, (1, 1024, 128) fbank, 16x16 patches; video B=16, (3, 16, 224, 224), 2x16x16
tubelets; encoder width 768, decoder width 512. Modes: forward, backward, forward+backward.
Dtypes (--dtype): bf16 (inputs and parameters bf16, every parameter and the positions trained,
given noise: the kernels' whole interface), fp32, or amp (as in training: fp32 inputs and
parameters under bf16 autocast, fixed positions, a bf16 prediction into the loss, and diffusion
noise drawn in the kernel from a seed against torch.randn before the plain path). On CUDA,
triton.testing.do_bench gives p20/p50/p80 in ms, and the table shows achieved GB/s and TFLOP/s
against the device's peak. On a CPU only the references run (Triton kernels need a GPU; the
interpreter is for correctness, not speed), timed with perf_counter. On CUDA each row also has
the kernels' device time per call from the profiler (launch overhead excluded: at these sizes
do_bench's wall time is mostly the host's). Rows are appended to
bench/results/kernels-<device>.csv (kernel, provider, mode, shape, p20/p50/p80, device,
versions, commit, device_ms), and each row's device time kernel by kernel to
bench/results/kernels-<device>-<dtype>-breakdown.txt (this run's only).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics

import torch

from fastmavil.diffusion import DiffusionSchedule
from fastmavil.masking import random_masking

from ._report import (add_results_option, commit, device_name, file_slug, gpu_time_ms,
                      positive_int, print_table, triton_version, wall_times_ms)

# Dense datasheet HBM bandwidth, GB/s, by device-name fragment (most specific first).
PEAK_GBPS = (("H100 PCIe", 2000.0), ("H100", 3350.0), ("H200", 4800.0), ("A100", 2039.0))
GEOMETRY = {"audio": dict(batch=32, shape=(1, 1024, 128), patch=(16, 16)),
            "video": dict(batch=16, shape=(3, 16, 224, 224), patch=(2, 16, 16))}


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "amp": torch.float32}


def _cases(device: torch.device, setting: str, modality: str, ratio: float):
    """(kernel name, fused fn, reference fn, FLOPs, bytes) per kernel, and the tensors they
    train (whose .grad a timed backward sets); fns take no arguments and return the output to
    time or backpropagate."""
    from kernels.diffuse_embed import diffuse_embed_masked, reference_diffuse_embed_masked
    from kernels.masked_mse import masked_patch_mse, reference_masked_patch_mse
    from kernels.patch_embed import patch_embed_visible, reference_patch_embed_visible

    dtype, amp = DTYPES[setting], setting == "amp"
    g = GEOMETRY[modality]
    b, patch = g["batch"], g["patch"]
    x = torch.randn(b, *g["shape"], device=device, dtype=dtype)
    n_tokens = math.prod(s // p for s, p in zip(g["shape"][1:], patch))
    p_dim = g["shape"][0] * math.prod(patch)
    ids = random_masking((b,), n_tokens, ratio, device)
    n, m = ids.keep.shape[1], ids.mask.shape[1]
    size = dtype.itemsize

    def params(dim):
        w = torch.randn(dim, g["shape"][0], *patch, device=device, dtype=dtype) * 0.02
        pos = torch.randn(n_tokens, dim, device=device, dtype=dtype)
        trained = (w, torch.zeros(dim, device=device, dtype=dtype)) + (() if amp else (pos,))
        return [t.requires_grad_() for t in trained] + ([pos] if amp else [])

    def run(fn, *fn_args, **kwargs):  # under bf16 autocast in the amp setting, as in training
        def call():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return fn(*fn_args, **kwargs)
        return call

    enc, dec = params(768), params(512)
    sched = DiffusionSchedule().to(device)
    t = sched.sample_timesteps(b, device)
    noise = torch.randn(b, m, p_dim, device=device, dtype=dtype)
    pred = torch.randn(b, m, p_dim, device=device, dtype=torch.bfloat16 if amp else dtype,
                       requires_grad=True)  # under autocast the decoder's head gives bf16
    diffusion = (x, ids.mask, t, sched.alpha_bar, *dec, patch, True)
    if amp:  # as in training: the kernel draws eps in place, the plain path draws it first
        seed = torch.randint(2**31 - 1, (1,), device=device)
        fused_diffuse = run(diffuse_embed_masked, *diffusion, seed=seed)

        def reference_diffuse():
            eps = torch.randn(noise.shape, device=device, dtype=dtype)
            return run(reference_diffuse_embed_masked, *diffusion, noise=eps)()
    else:  # the kernel's interface, given noise
        fused_diffuse = run(diffuse_embed_masked, *diffusion, noise=noise)
        reference_diffuse = run(reference_diffuse_embed_masked, *diffusion, noise=noise)
    leaves = [t for t in (*enc, *dec, pred) if t.requires_grad]
    return leaves, [
        ("patch_embed_visible",
         run(patch_embed_visible, x, ids.keep, *enc, patch),
         run(reference_patch_embed_visible, x, ids.keep, *enc, patch),
         2 * b * n * p_dim * 768, size * (b * n * p_dim + 768 * p_dim + 2 * b * n * 768)),
        ("diffuse_embed_masked", fused_diffuse, reference_diffuse,
         2 * b * m * p_dim * 512, size * (2 * b * m * p_dim + 512 * p_dim + 2 * b * m * 512)),
        ("masked_patch_mse",
         run(masked_patch_mse, pred, x, ids.mask, patch, True),
         run(reference_masked_patch_mse, pred, x, ids.mask, patch, True),
         3 * b * m * p_dim, (pred.element_size() + size) * b * m * p_dim),
    ]


def _time(fn, device: torch.device, reps: int) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return tuple(do_bench(fn, quantiles=[0.2, 0.5, 0.8]))
    times = wall_times_ms(fn, reps)
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return q[1], statistics.median(times), q[7]


def _timed_fn(make, mode: str, leaves: list[torch.Tensor]):
    """What to time for one mode: the forward, the backward alone (graph kept), or both. A
    backward starts with the leaves' .grad cleared (no kernel): each call writes its gradients
    instead of adding them into the last call's, an add per leaf that both providers paid
    before and that made the ratios look closer to 1."""
    def clear():
        for leaf in leaves:
            leaf.grad = None
    if mode == "forward":
        return make
    if mode == "forward+backward":
        def both():
            clear()
            out = make()
            out.backward(torch.ones_like(out))
        return both
    out = make()
    grad = torch.ones_like(out)

    def backward():
        clear()
        out.backward(grad, retain_graph=True)
    return backward


def _against_target(speedup: float | None) -> str:
    """A speedup against the kernels' target, >= 2x forward+backward."""
    return "-" if speedup is None else f"{speedup:.2f}x ({'>=' if speedup >= 2 else '<'} 2x)"


def _autotuned() -> list[str]:
    """The config each autotuned kernel chose, per tuning key: which candidates earn their
    compile time."""
    from kernels import _token_grads, diffuse_embed, masked_mse
    tuners = {"diffuse_embed x_t": diffuse_embed._diffuse_tuned,
              "embedding grad_pos gather": _token_grads._gather_tuned,
              **{f"masked_mse {getattr(k, '__name__', k)}": t
                 for k, t in masked_mse._tuned.items()}}
    return [f"{name} {key}: {config}" for name, tuner in tuners.items()
            for key, config in getattr(tuner, "cache", {}).items()]


HEADER = ["kernel", "provider", "mode", "shape", "p20_ms", "p50_ms", "p80_ms", "device", "torch",
          "triton", "commit", "device_ms"]


def _append_rows(path, rows: list[list]) -> None:
    """Appends to the CSV; a file from before the device_ms column is first rewritten with that
    column empty (through a temporary file, so an interrupted run loses no rows)."""
    if path.exists():
        with path.open(newline="") as f:
            old = list(csv.reader(f))
        if old and old[0] == HEADER[:-1]:
            tmp = path.with_suffix(".tmp")
            with tmp.open("w", newline="") as f:
                csv.writer(f).writerows([HEADER] + [r + [""] for r in old[1:]])
            os.replace(tmp, path)
        elif old and old[0] != HEADER:
            raise SystemExit(f"{path}: unexpected columns {old[0]}; move the file aside")
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(HEADER)
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.9],
                        help="masking ratios, each in (0, 1)")
    parser.add_argument("--modalities", nargs="+", choices=list(GEOMETRY),
                        default=list(GEOMETRY))
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="bf16, fp32, or amp (fp32 under bf16 autocast, as in training); "
                             "default: bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--reps", type=positive_int, default=5, help="repeats per CPU timing")
    add_results_option(parser)
    args = parser.parse_args(argv)
    if not all(0 < ratio < 1 for ratio in args.ratios):
        parser.error(f"--ratios {' '.join(map(str, args.ratios))}: each must lie in (0, 1)")

    from fastmavil.train.metrics import device_peak_flops

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    setting = args.dtype or ("bf16" if cuda else "fp32")
    dtype = torch.bfloat16 if setting == "amp" else DTYPES[setting]  # the matmuls' dtype
    name = device_name(device)
    if not cuda:
        print("No CUDA device: timing the PyTorch references only (Triton kernels run "
                      "natively on GPUs; on a CPU only through the interpreter, for tests).")
    peak_flops, _ = device_peak_flops(device, dtype)
    peak_gbps = next((v for k, v in PEAK_GBPS if k.lower() in name.lower()), None)
    triton_text = triton_version() or "none"
    head = commit()
    providers = ("triton", "torch") if cuda else ("torch",)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"kernels-{file_slug(name) if cuda else 'cpu'}.csv"
    written, table, target = 0, [], []  # target: forward+backward speedups, wall and device
    # each row's device time kernel by kernel, this run's only (overwritten by the next)
    parts_out = args.results / f"kernels-{file_slug(name)}-{setting}-breakdown.txt"
    parts_text = [f"device ms per call and its kernels ({name}, torch {torch.__version__}, "
                  f"triton {triton_text}, commit {head}, {setting})"]
    for modality in args.modalities:
        for ratio in args.ratios:
            leaves, cases = _cases(device, setting, modality, ratio)
            for kernel, fused, reference, flops, nbytes in cases:
                shape = f"{modality} B={GEOMETRY[modality]['batch']} rho={ratio} {setting}"
                for mode in ("forward", "backward", "forward+backward"):
                    timings, device_ms, measured = {}, {}, []
                    for provider in providers:
                        fn = _timed_fn(fused if provider == "triton" else reference, mode,
                                       leaves)
                        timings[provider] = _time(fn, device, args.reps)
                        device_ms[provider], parts = gpu_time_ms(fn) if cuda else (None, [])
                        parts_text += [f"{kernel} {shape} {mode} {provider}: "
                                       f"{device_ms[provider] or 0:.4f} ms"] + [
                            f"  {us:9.2f} us  {count:5.1f}x  {kernel_name[:110]}"
                            for kernel_name, us, count in parts]
                        measured.append([kernel, provider, mode, shape, *timings[provider], name,
                                         torch.__version__, triton_text, head,
                                         "" if device_ms[provider] is None
                                         else f"{device_ms[provider]:.4f}"])
                    # Kept as measured: a run cut short (a time limit) loses no finished row.
                    _append_rows(out, measured)
                    if cuda:
                        parts_out.write_text("\n".join(parts_text) + "\n")
                    written += len(measured)
                    print(f"{kernel} {shape} {mode}: " + ", ".join(
                        f"{p} {timings[p][1]:.3f} ms" for p in providers), flush=True)
                    for provider, (p20, p50, p80) in timings.items():
                        # backward does about the forward's work: the embeddings' weight
                        # gradient (no input gradient), one matmul; the loss, one pass
                        work = {"forward": 1, "backward": 1, "forward+backward": 2}[mode]
                        gbps = nbytes * work / p50 / 1e6
                        tf = flops * work / p50 / 1e9
                        gb_text = f"{gbps:.0f}" + (f" ({gbps / peak_gbps:.0%})" if peak_gbps
                                                   else "")
                        tf_text = f"{tf:.2f}" + (f" ({tf * 1e12 / peak_flops:.0%})"
                                                 if peak_flops else "")
                        speedup = (f"{timings['torch'][1] / p50:.2f}x"
                                   if provider == "triton" else "")
                        dev = device_ms[provider]
                        both = dev and device_ms["torch"]  # None: the profiler saw nothing
                        dev_speedup = (f"{device_ms['torch'] / dev:.2f}x"
                                       if provider == "triton" and both else "")
                        table.append([kernel, shape, mode, provider,
                                      f"{p50:.3f} [{p20:.3f}-{p80:.3f}]", gb_text, tf_text,
                                      speedup, "-" if dev is None else f"{dev:.3f}",
                                      dev_speedup])
                        if provider == "triton" and mode == "forward+backward":
                            target.append((kernel, shape, timings["torch"][1] / p50,
                                           device_ms["torch"] / dev if both else None))
    print_table(f"Kernels on {name} ({setting}): wall ms p50 [p20-p80] (GB/s and TFLOP/s from it), "
                "and kernel time alone (device ms)",
                ["kernel", "input", "mode", "provider", "ms", "GB/s", "TFLOP/s", "speedup",
                 "device ms", "device speedup"], table)
    print(f"appended {written} rows to {out}")
    for kernel, shape, wall, dev in target:
        print(f"forward+backward speedup, {kernel} {shape}: wall {_against_target(wall)}, "
              f"device {_against_target(dev)}")
    if cuda:
        print("autotuned:", *_autotuned(), sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
