"""Compile every Triton kernel variant of the CUDA path for a GPU architecture, on any machine.

A kernel that Triton rejects for CUDA, or an autotune candidate that needs more shared memory
than the device has, otherwise shows up only on a GPU, and GPU time is short. This check runs
the kernels' public functions (forward and backward) on small CPU tensors with every Triton
launch intercepted, then compiles each intercepted launch for every autotune candidate the way
Triton's JIT would on the target (same argument specialisation, constexprs and options; ptxas
included) and compares its shared memory with the target's per-block limit. A candidate over
the limit is dropped by the autotuner, so the check fails on a compile error or on a launch
that no candidate fits. Each line also gives ptxas's registers per thread and spill bytes
(stores/loads): a static hint of a candidate's cost (Triton's cache is bypassed so that ptxas
runs for each).

    python -m kernels.compile_check                # sm_90 (H100/H200), every setting
    python -m kernels.compile_check --settings amp # the training setting only
    python -m kernels.compile_check --arch 80      # A100

Settings: `fp32` (IEEE fp32 products, the CUDA parity tests), `bf16` (bf16 inputs, as
bench.kernels) and `amp` (fp32 inputs under bf16 autocast, as training), each on audio and
video patch geometry, with every flag (norm_pix, given or in-kernel noise, patches saved for
backward or not) taking both values; the window attention's in each setting, with a learned,
a fixed and no bias; the sequence attention's (self and cross) in each setting. Needs a Triton
with the NVIDIA backend (its bundled ptxas), no GPU, and TRITON_INTERPRET unset (the
interpreter replaces the JIT). Uses Triton's internal binder and argument packing
(`create_function_from_signature`, `JITFunction._pack_args`), as in Triton 3.6-3.9; another
Triton may fail here without the kernels being at fault.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import re
import sys
import time
from dataclasses import dataclass

import torch

import kernels

# Opt-in shared memory per block (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                120: 101376}
SETTINGS = ("fp32", "bf16", "amp")
GEOMETRIES = {"audio": ((2, 1, 64, 48), (16, 16)), "video": ((2, 3, 4, 48, 32), (2, 16, 16))}


@dataclass
class Launch:
    fn: object           # the JITFunction
    args: tuple
    kwargs: dict
    configs: list[dict]  # every autotune candidate's kwargs (one empty dict when not autotuned)
    label: str = ""


@contextlib.contextmanager
def intercepted_launches(launches: list[Launch]):
    """Within: kernels run their CUDA code path on any tensors, and every Triton launch is
    recorded in `launches` instead of run (outputs stay uninitialised)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def autotuned(self, *args, grid=None, warmup=False, **kwargs):
        launches.append(Launch(self.fn, args, kwargs, [c.all_kwargs() for c in self.configs]))

    def jitted(self, *args, grid=None, warmup=False, **kwargs):
        launches.append(Launch(self, args, kwargs, [{}]))

    patches = [(Autotuner, "run", autotuned), (JITFunction, "run", jitted),
               (kernels, "can_launch", lambda *tensors, **_: True),
               (kernels, "interpreting", lambda: False)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, new in patches:
            setattr(owner, name, new)
        yield launches
    finally:
        for owner, name, old in saved:
            setattr(owner, name, old)


def _setting(name: str) -> tuple[torch.dtype, contextlib.AbstractContextManager]:
    """Input and parameter dtype, and the context, of a setting."""
    if name == "amp":
        return torch.float32, torch.autocast("cpu", dtype=torch.bfloat16)
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name], contextlib.nullcontext()


def _run_kernels(setting: str, shape: tuple[int, ...], patch: tuple[int, ...],
                 gen: torch.Generator) -> None:
    """The kernels' calls in three cases, so that each flag takes both values: as training makes
    them (forward and backward, parameters with gradients, fixed positions, seeded noise,
    norm_pix), both embeddings with trained positions and the diffusion input with given noise
    as the tests call them, and all three without norm_pix under no_grad (nothing saved for
    backward)."""
    from kernels.diffuse_embed import diffuse_embed_masked
    from kernels.masked_mse import masked_patch_mse
    from kernels.patch_embed import patch_embed_visible

    dtype, autocast = _setting(setting)
    pdtype = torch.float32 if setting == "amp" else dtype  # amp: fp32 master weights
    x = torch.randn(shape, generator=gen, dtype=dtype)
    n_tokens = math.prod(s // p for s, p in zip(shape[2:], patch))
    p_dim = shape[1] * math.prod(patch)
    ids = torch.randperm(n_tokens, generator=gen).repeat(shape[0], 1)
    keep, mask = ids[:, : n_tokens // 4], ids[:, n_tokens // 4:]
    t = torch.randint(1, 1000, (shape[0],), generator=gen)
    alpha_bar = torch.linspace(1.0, 0.01, 1001)

    def param(*size):
        return torch.randn(*size, generator=gen, dtype=pdtype).requires_grad_()

    def pos(dim, trained):
        return param(n_tokens, dim) if trained else torch.randn(n_tokens, dim, dtype=pdtype)

    def diffused(norm_pix, trained_pos=False, **noise):
        return diffuse_embed_masked(x, mask, t, alpha_bar, param(512, p_dim), param(512),
                                    pos(512, trained_pos), patch, norm_pix, **noise).float().sum()

    def embedded_and_loss(norm_pix, trained_pos=False):
        embedded = patch_embed_visible(x, keep, param(768, shape[1], *patch), param(768),
                                       pos(768, trained_pos), patch)
        pred = param(*mask.shape, p_dim)  # the decoder's prediction: bf16 under autocast
        pred = pred.to(torch.bfloat16) if setting == "amp" else pred
        return embedded.float().sum() + masked_patch_mse(pred, x, mask, patch, norm_pix)

    with autocast:
        training = diffused(True, seed=7) + embedded_and_loss(True)
        given_noise = diffused(True, True, noise=torch.randn(*mask.shape, p_dim, dtype=dtype))
        trained_pos = embedded_and_loss(True, trained_pos=True)
    (training + given_noise + trained_pos).backward()
    with autocast, torch.no_grad():
        diffused(False, seed=7) + embedded_and_loss(False)


def _run_window_attention(setting: str, gen: torch.Generator) -> None:
    """The window attention kernels as the Swin decoder calls them (4 x 4 windows, 32-wide
    heads; bf16 q, k, v under autocast, an fp32 learned bias), with a bias that needs no
    gradient (a shift mask alone) and with none, at a batch of several chunks of samples and
    at one of a single sample; and at the largest window and head the kernels accept."""
    from kernels.window_attention import MAX_HEAD_DIM, MAX_WINDOW, window_attention

    dtype = torch.float32 if setting == "fp32" else torch.bfloat16
    for batch, bias_kind, length, dim in ((32, "learned", 16, 32), (1, "fixed", 16, 32),
                                          (3, None, 16, 32),
                                          (2, "learned", MAX_WINDOW, MAX_HEAD_DIM)):
        q, k, v = (torch.randn(batch, 6, length, dim, generator=gen,
                               dtype=dtype).requires_grad_() for _ in range(3))
        bias = (None if bias_kind is None else torch.randn(6, length, length, generator=gen)
                .requires_grad_(bias_kind == "learned"))
        window_attention(q, k, v, bias).float().sum().backward()


def _run_attention(setting: str, gen: torch.Generator) -> None:
    """The attention kernels as the model calls them under backend triton: self-attention on a
    packed qkv and cross-attention on q and a packed kv, with the encoders' 64-wide heads, the
    decoders' 32-wide ones and the widest the kernels take. In bf16 in the bf16 and amp
    settings: under autocast the projections hand the kernels bf16."""
    from kernels.attention import MAX_HEAD_DIM, cross_attention, self_attention

    dtype = torch.float32 if setting == "fp32" else torch.bfloat16
    for heads, head_dim in ((2, 64), (2, 32), (1, MAX_HEAD_DIM)):
        width = heads * head_dim

        def tensor(*shape):
            return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()
        out = self_attention(tensor(2, 37, 3 * width), heads)
        out = out.float().sum() + cross_attention(tensor(2, 19, width), tensor(2, 11, 2 * width),
                                                  heads).float().sum()
        out.backward()


def record_launches(settings=SETTINGS) -> list[Launch]:
    """The launches of `_run_kernels` per setting and geometry, of the window and the
    sequence attention per setting, and of the Philox noise."""
    from kernels.diffuse_embed import philox_noise

    gen = torch.Generator().manual_seed(0)
    launches: list[Launch] = []
    with intercepted_launches(launches):
        for setting in settings:
            for geo, (shape, patch) in GEOMETRIES.items():
                start = len(launches)
                _run_kernels(setting, shape, patch, gen)
                for launch in launches[start:]:
                    launch.label = f"{setting} {geo}"
            for label, run in (("window", _run_window_attention), ("attention", _run_attention)):
                start = len(launches)
                run(setting, gen)
                for launch in launches[start:]:
                    launch.label = f"{setting} {label}"
        philox_noise(7, 2, 3, 5, "cpu")
        launches[-1].label = "any"
    return launches


def compile_launch(launch: Launch, config: dict, target):
    """The kernel Triton's JIT would build for this launch and config on `target`."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, kwargs = launch.fn, {**launch.kwargs, **config}
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def compile_with_ptxas_report(launch: Launch, config: dict, target) -> tuple[object, str]:
    """compile_launch, bypassing Triton's cache so that ptxas runs, and ptxas's report:
    registers per thread and spill bytes (stores/loads), e.g. "regs 255 spills 40/48"."""
    from triton import knobs

    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True  # printed by Triton's ptxas step
        kernel = compile_launch(launch, config, target)
    regs = re.findall(r"Used (\d+) registers", log.getvalue())
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    report = (f"regs {regs[-1] if regs else '?'} spills "
              + ("/".join(spills[-1]) if spills else "?"))
    return kernel, report


def _signature(launch: Launch) -> str:
    """What selects a compiled variant: argument dtypes, integers as Triton specialises them
    (equal to 1, divisible by 16, other), and the call's constexprs."""
    def spec(a) -> str:
        if isinstance(a, torch.Tensor):
            return str(a.dtype)
        if isinstance(a, int) and not isinstance(a, bool):
            return "int=1" if a == 1 else "int%16" if a % 16 == 0 else "int"
        return type(a).__name__
    return repr(([spec(a) for a in launch.args], sorted(launch.kwargs.items())))


def _flags(launch: Launch) -> str:
    return " ".join(k for k, v in launch.kwargs.items() if v is True)


def _describe(config: dict, kwargs: dict) -> str:
    """A candidate's blocks (with the launch's) and its switches that are on (UNROLL)."""
    merged = {**kwargs, **config}
    blocks = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in merged.items()
                      if k.startswith("BLOCK"))
    blocks += "".join(f" {k}" for k, v in config.items() if v is True)
    return f"{blocks} w={merged.get('num_warps', '-')} s={merged.get('num_stages', '-')}"


def check(arch: int = 90, settings=SETTINGS, shared_limit: int | None = None,
          out=sys.stdout) -> int:
    """Compile every recorded launch's candidates for sm_<arch> and print one line each: `ok`,
    `over` (more shared memory than the limit: the autotuner drops it, as Triton raises
    OutOfResources for it) or `FAIL` (a compile error); then a `FAIL` line for each launch that
    no candidate fits. Returns the number of compile errors and launches without a fit."""
    from triton.backends.compiler import GPUTarget

    limit = shared_limit or SHARED_LIMIT.get(arch)
    if limit is None:
        raise ValueError(f"no shared-memory limit known for sm_{arch}; pass --shared-limit")
    target = GPUTarget("cuda", arch, 32)
    seen, count, over, errors, unfit, start = set(), 0, 0, 0, 0, time.perf_counter()
    for launch in record_launches(settings):
        name, fits, tried = launch.fn.__name__, 0, 0
        where = f"{name:24} {launch.label:12} {_flags(launch):28}"
        for config in launch.configs:
            key = (name, launch.label, _signature(launch), repr(sorted(config.items())))
            if key in seen:  # the same variant launched twice (e.g. by two calls)
                continue
            seen.add(key)
            count += 1
            describe = _describe(config, launch.kwargs)
            try:
                kernel, ptxas = compile_with_ptxas_report(launch, config, target)
            except Exception as err:  # noqa: BLE001 -- report every variant, then fail
                errors += 1
                # Triton's CompilationError opens with the place and ends with the cause
                lines = [line for line in str(err).strip().splitlines() if line.strip()]
                text = " ... ".join(dict.fromkeys((lines[0], lines[-1]))) if lines else ""
                print(f"FAIL {where} {describe}: {type(err).__name__}: {text}", file=out,
                      flush=True)
                continue
            shared = kernel.metadata.shared
            tried += 1
            fits += shared <= limit
            over += shared > limit
            print(f"{'ok  ' if shared <= limit else 'over'} {where} {describe:30} {ptxas:22}"
                  f" shared {shared:>6} B", file=out, flush=True)
        if tried and not fits:
            unfit += 1
            print(f"FAIL {where} no candidate fits {limit} B of shared memory", file=out,
                  flush=True)
    print(f"{count} variants compiled for sm_{arch} in {time.perf_counter() - start:.0f} s: "
          f"{over} over the shared-memory limit of {limit} B per block (the autotuner drops "
          f"them), {unfit} launches that no candidate fits, {errors} compile errors", file=out)
    return unfit + errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated subset of {','.join(SETTINGS)} (default: all)")
    parser.add_argument("--shared-limit", type=int, default=None,
                        help="shared memory per block in bytes (default: the arch's)")
    args = parser.parse_args(argv)
    if kernels.interpreting():
        parser.error("TRITON_INTERPRET=1 replaces Triton's JIT with the interpreter; unset it")
    if not kernels.triton_available():
        parser.error("triton is not installed")
    settings = tuple(args.settings.split(","))
    if not settings or not set(settings) <= set(SETTINGS):
        parser.error(f"--settings {args.settings!r}: expected names from {','.join(SETTINGS)}")
    return 1 if check(args.arch, settings, args.shared_limit) else 0


if __name__ == "__main__":
    sys.exit(main())
