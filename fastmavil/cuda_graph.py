"""Training work replayed as CUDA graphs, one per shape: the whole step (GraphedStep, for
bench.throughput) or each forward + backward pass (GraphedPasses, for the trainer).

Why: at base size on an H200 the step is bound by the host, not the GPU. The eager fast path
launches ~3,700 kernels per R4 step and its device time is 107 ms; with compiled blocks the
device needs only 84 ms, but the step still took 143 ms, and across R3's curriculum the step
time stayed at 123-142 ms while its FLOPs grew by half (bench/results, f080127). A replayed
graph launches its work at once, so the step's time follows the GPU's work.

What capture needs, and the model's step meets: no host syncs (the step is sync-free:
tests/kernels/test_model_step.py), random numbers from generators registered with the graph
(masking, timesteps and the kernels' noise seed come from the step's generator; dropout from
the default one, which is registered by itself), Triton autotuning done before capture (the
eager warm-up calls, on a side stream as PyTorch's whole-network recipe does), and autocast
without its weight-cast cache.

A shape is the batch's layout, the masking ratio and the passes per step (the loss's scale), so a
curriculum captures one graph per distinct (rho, samples per pass): R4 has 11. Graphs of one layout
read the same input buffers, into which each call's batch is copied. The graphs share one memory
pool (and may share it with other replayers that never run at the same time): nothing a replay
leaves behind is read by another graph, and the outputs are read before the next replay, which may
overwrite them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple  # the buffers it reads the batch from
    outputs: object


class _Replayer:
    """fn(*tensors) run eagerly `warmup` times per shape, then captured and replayed."""

    def __init__(self, model: nn.Module, generator: torch.Generator, warmup: int,
                 pool: tuple | None):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model; this one is on {device}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (autotuning and lazy state before capture); "
                             f"got {warmup}")
        self.generator, self.warmup = generator, warmup
        self.pool = torch.cuda.graph_pool_handle() if pool is None else pool
        self.graphs: dict[tuple, _Captured] = {}
        self.eager_calls: dict[tuple, int] = {}
        self.inputs: dict[tuple, tuple] = {}  # by layout

    def run(self, fn: Callable, tensors: tuple, key: tuple, before: Callable = lambda: None):
        """fn(*tensors) for this shape (`key` adds what else selects a graph); `before` runs
        ahead of every eager call and capture."""
        layout = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in tensors)
        key = (*layout, *key)
        captured = self.graphs.get(key)
        if captured is None:
            done = self.eager_calls.get(key, 0)
            if done < self.warmup:
                self.eager_calls[key] = done + 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    before()
                    outputs = fn(*tensors)
                torch.cuda.current_stream().wait_stream(side)
                # made on the side stream, read on this one: their memory must not be reused
                # for the side stream's (a pooled stream's) later work before this one is done
                for t in _tensors(outputs):
                    t.record_stream(torch.cuda.current_stream())
                return outputs
            if layout not in self.inputs:
                self.inputs[layout] = tuple(None if t is None else t.clone() for t in tensors)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.generator)
            before()
            # thread_local: the loader's pin-memory thread keeps making CUDA calls, which the
            # default ("global") mode would count as breaking the capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = fn(*self.inputs[layout])
            captured = self.graphs[key] = _Captured(graph, self.inputs[layout], outputs)
        for buffer, batch in zip(captured.inputs, tensors):
            if buffer is not None and buffer.data_ptr() != batch.data_ptr():
                buffer.copy_(batch, non_blocking=True)
        captured.graph.replay()
        return captured.outputs

    def pool_idle_bytes(self) -> int | None:
        """Bytes the graphs' memory pool holds beyond its live tensors: the activations each
        replay writes there, which the allocator's peak misses once captured (a replay
        allocates nothing). None where this torch cannot say."""
        try:
            segments = torch.cuda.memory_snapshot(mempool_id=self.pool, include_traces=False)
            return sum(s["total_size"] - s["allocated_size"] for s in segments)
        except (TypeError, KeyError, RuntimeError):
            return None


def _tensors(outputs) -> list[torch.Tensor]:
    """The tensors of a step's or pass's outputs: a tensor, or (loss, {name: tensor})."""
    if torch.is_tensor(outputs):
        return [outputs]
    return [t for item in outputs
            for t in (item.values() if isinstance(item, dict) else [item]) if torch.is_tensor(t)]


def _autocast(dtype: torch.dtype | None):
    return (torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype is not None
            else contextlib.nullcontext())


class GraphedStep(_Replayer):
    """step(audio, video, ratio) -> loss: one optimiser step, as the eager

        with autocast: loss = model(audio, video, ratio, generator).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)

    but replayed from a CUDA graph once a shape has run `warmup` eager steps. Each call is
    exactly one step. The returned loss lives in the pool: read it (or clone it) before the
    next step. The parameters' .grad after a step are not that step's gradients (a graph keeps
    its own, allocated in the capture). The optimiser needs `capturable=True`, and its
    hyperparameters are baked into the captured step: a step refuses to replay once they have
    changed (a schedule would need them as tensors). `pool` (torch.cuda.graph_pool_handle())
    lets replayers that never run concurrently share their memory; by default each has its own.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator, autocast_dtype: torch.dtype | None = torch.bfloat16,
                 warmup: int = 3, pool: tuple | None = None):
        if not all(group.get("capturable") for group in optimizer.param_groups):
            raise ValueError("a captured optimiser step needs the optimiser built with "
                             "capturable=True (e.g. AdamW(..., fused=True, capturable=True))")
        super().__init__(model, generator, warmup, pool)
        self.model, self.optimizer, self.autocast_dtype = model, optimizer, autocast_dtype
        self.hyperparameters = None  # the optimiser's, as the first capture baked them in

    def step(self, audio: torch.Tensor, video: torch.Tensor | None, ratio: float) -> torch.Tensor:
        if self.graphs and self._hyperparameters() != self.hyperparameters:
            raise ValueError("the optimiser's hyperparameters changed since the step was "
                             f"captured ({self.hyperparameters} -> {self._hyperparameters()}); "
                             "a captured step would go on using the old ones")
        # set_to_none before each eager step and capture: after a capture the gradients are
        # that graph's tensors, which an eager backward would accumulate into; in a capture they
        # are allocated afresh, written by backward and read by the captured optimiser step at
        # the same addresses on every replay
        loss = self.run(lambda a, v: self._step(a, v, ratio), (audio, video), (float(ratio),),
                        before=lambda: self.optimizer.zero_grad(set_to_none=True))
        if self.hyperparameters is None and self.graphs:
            self.hyperparameters = self._hyperparameters()
        return loss

    def _hyperparameters(self) -> list[dict]:
        """The values a capture bakes in: a tensor (lr as a tensor, say) is read on replay."""
        def baked(value):
            items = value if isinstance(value, (tuple, list)) else (value,)
            return not any(torch.is_tensor(item) for item in items)
        return [{k: v for k, v in group.items() if k != "params" and baked(v)}
                for group in self.optimizer.param_groups]

    def _step(self, audio, video, ratio) -> torch.Tensor:
        with _autocast(self.autocast_dtype):
            loss = self.model(audio, video, ratio, self.generator).loss
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class GraphedPasses(_Replayer):
    """The trainer's forward + backward passes replayed as CUDA graphs; clipping, the optimiser
    step and the lr schedule stay eager (they launch little and change per step).

    passes(audio, video, ratio, passes) -> (loss, terms): adds d (loss / passes) / d parameter
    to each trainable parameter's .grad, which holds fixed buffers from here on (zero them with
    `zero_grads`, never set them to None: the graphs add into these addresses), and returns the
    pass's loss and loss terms, detached, which the next replay may overwrite. The same pass
    (`accumulate_pass`) runs eagerly for the first `warmup` calls of each shape. The gradients
    are views of one buffer per dtype (`buffers`), so zeroing them is one fill and averaging
    them over torchrun's processes (`average_over`; a graph holds no all-reduce) one call, as
    DistributedDataParallel's bucket views do. Unlike eager passes, a parameter that gets no
    gradient still holds a (zero) buffer, so AdamW decays it where an eager step would skip it;
    every parameter of the shipped configs gets a gradient in every pass. The gradients of a
    pass take one more copy of the parameters' size in the pool (torch.autograd.grad's result,
    added into the buffers), which `backward()` would not.
    """

    def __init__(self, model: nn.Module, generator: torch.Generator,
                 autocast_dtype: torch.dtype | None = torch.bfloat16, warmup: int = 1,
                 pool: tuple | None = None):
        super().__init__(model, generator, warmup, pool)
        self.model, self.autocast_dtype = model, autocast_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.buffers = flat_gradients(self.params)
        self.grads = [p.grad for p in self.params]

    def __call__(self, audio: torch.Tensor, video: torch.Tensor | None, ratio: float,
                 passes: int) -> tuple[torch.Tensor, dict]:
        if any(p.grad is not g for p, g in zip(self.params, self.grads)):
            raise RuntimeError("a parameter's .grad was replaced (zero_grad(set_to_none=True)?):"
                               " the captured passes add into the original buffers; use "
                               "GraphedPasses.zero_grads()")
        return self.run(lambda a, v: accumulate_pass(self.model, self.params, a, v, ratio,
                                                     self.generator, passes,
                                                     _autocast(self.autocast_dtype)),
                        (audio, video), (float(ratio), int(passes)))

    def zero_grads(self) -> None:
        for buffer in self.buffers:
            buffer.zero_()

    def average_over(self, world) -> None:
        """The gradients replaced by their mean over `world`'s processes
        (fastmavil.train.distributed.World): after a step's passes, before clipping."""
        for buffer in self.buffers:
            world.average_(buffer)


def flat_gradients(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gives each of `params` a .grad that is a view of one buffer per dtype, in order (holding
    the gradient it had, or zeros), and returns the buffers. A non-contiguous parameter gets a
    buffer of its own in its layout: the fused AdamW reads a parameter and its gradient as the
    same memory order."""
    buffers = []
    for p in params:
        if not p.is_contiguous():
            buffer = torch.zeros_like(p)  # p's strides
            if p.grad is not None:
                buffer.copy_(p.grad)
            p.grad = buffer
            buffers.append(buffer)
    for dtype in dict.fromkeys(p.dtype for p in params if p.is_contiguous()):
        group = [p for p in params if p.dtype == dtype and p.is_contiguous()]
        buffer = group[0].new_zeros(sum(p.numel() for p in group))
        for p, view in zip(group, buffer.split([p.numel() for p in group])):
            view = view.view_as(p)
            if p.grad is not None:
                view.copy_(p.grad)
            p.grad = view
        buffers.append(buffer)
    return buffers


def accumulate_pass(model: nn.Module, params: list[torch.Tensor], audio, video, ratio: float,
                    generator: torch.Generator | None, passes: int,
                    autocast=contextlib.nullcontext()) -> tuple[torch.Tensor, dict]:
    """One forward + backward pass that adds d (loss / passes) / d p into each p.grad (which
    must exist): `(loss / passes).backward()`'s accumulation written out, so that a capture adds
    into fixed buffers. Returns the detached loss and terms."""
    with autocast:
        out = model(audio, video, ratio, generator)
    grads = torch.autograd.grad(out.loss / passes, params, allow_unused=True)
    used = [(p.grad, g) for p, g in zip(params, grads) if g is not None]
    torch._foreach_add_([acc for acc, _ in used], [g for _, g in used])
    return out.loss.detach(), {k: v.detach() for k, v in out.terms.items()}
