"""A whole training step (forward, backward, optimiser) replayed as one CUDA graph per shape.

Why: at base size on an H200 the step is bound by the host, not the GPU. The eager fast path
launches ~3,700 kernels per R4 step and its device time is 107 ms; with compiled blocks the
device needs only 84 ms, but the step still took 143 ms, and across R3's curriculum the step
time stayed at 123-142 ms while its FLOPs grew by half (bench/results, f080127). A replayed
graph launches the step at once, so the step's time follows the GPU's work.

What capture needs, and the step here meets: no host syncs inside the step (the model's step is
sync-free: tests/kernels/test_model_step.py), random numbers from generators registered with the
graph (masking, timesteps and the kernels' noise seed come from the step's generator; dropout
from the default one, which is registered by itself), an optimiser with `capturable=True`, Triton
autotuning done before capture (the warm-up steps), and autocast without its weight-cast cache.

A step's shape is its batch shapes and masking ratio, so a curriculum captures one graph per
distinct (rho, B): R4 has 11. Graphs of the same batch shape read the same input buffers, into
which each step's batch is copied. The graphs share one memory pool (and may share it with
other GraphedSteps that never run at the same time): nothing a replay leaves behind is read by
another graph (each writes its gradients before its optimiser step reads them), and the loss
is read before the next replay. The optimiser's hyperparameters are baked into the captured
step: a step refuses to replay once they have changed (a schedule needs them as tensors,
which the trainer does not use yet).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, torch.Tensor | None]  # the buffers it reads the batch from
    loss: torch.Tensor


class GraphedStep:
    """step(audio, video, ratio) -> loss: one optimiser step, as the eager

        with autocast: loss = model(audio, video, ratio, generator).loss
        loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)

    but replayed from a CUDA graph once a shape has run `warmup` eager steps (on a side stream,
    as PyTorch's whole-network capture recipe does). Each call is exactly one step. The returned
    loss lives in the shared pool: the next replay of any graph may overwrite it, so read it
    (or clone it) before the next step. The parameters' .grad after a step are not that step's
    gradients (a graph keeps its own). `pool` (torch.cuda.graph_pool_handle()) lets
    GraphedSteps that never run concurrently share their memory; by default each has its own.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator, autocast_dtype: torch.dtype | None = torch.bfloat16,
                 warmup: int = 3, pool: tuple | None = None):
        if not all(group.get("capturable") for group in optimizer.param_groups):
            raise ValueError("a captured optimiser step needs the optimiser built with "
                             "capturable=True (e.g. AdamW(..., fused=True, capturable=True))")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model; this one is on {device}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (autotuning and lazy state before capture); "
                             f"got {warmup}")
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.autocast_dtype, self.warmup = autocast_dtype, warmup
        self.pool = torch.cuda.graph_pool_handle() if pool is None else pool
        self.graphs: dict[tuple, _Captured] = {}
        self.eager_steps: dict[tuple, int] = {}
        self.inputs: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}  # by layout
        self.hyperparameters = None  # the optimiser's, as the first capture baked them in

    def step(self, audio: torch.Tensor, video: torch.Tensor | None, ratio: float) -> torch.Tensor:
        shapes = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in (audio, video))
        key = (*shapes, float(ratio))
        captured = self.graphs.get(key)
        if self.graphs and self._hyperparameters() != self.hyperparameters:
            raise ValueError("the optimiser's hyperparameters changed since the step was "
                             f"captured ({self.hyperparameters} -> {self._hyperparameters()}); "
                             "a captured step would go on using the old ones")
        if captured is None:
            done = self.eager_steps.get(key, 0)
            if done < self.warmup:
                self.eager_steps[key] = done + 1
                return self._warmup_step(audio, video, ratio)
            if shapes not in self.inputs:
                self.inputs[shapes] = (audio.clone(), None if video is None else video.clone())
            captured = self.graphs[key] = self._capture(self.inputs[shapes], ratio)
            self.hyperparameters = self._hyperparameters()
        for buffer, batch in zip(captured.inputs, (audio, video)):
            if buffer is not None and buffer.data_ptr() != batch.data_ptr():
                buffer.copy_(batch, non_blocking=True)
        captured.graph.replay()
        return captured.loss

    def _hyperparameters(self) -> list[dict]:
        """The values a capture bakes in: a tensor (lr as a tensor, say) is read on replay."""
        def baked(value):
            items = value if isinstance(value, (tuple, list)) else (value,)
            return not any(torch.is_tensor(item) for item in items)
        return [{k: v for k, v in group.items() if k != "params" and baked(v)}
                for group in self.optimizer.param_groups]

    def _forward_backward(self, audio, video, ratio) -> torch.Tensor:
        autocast = (torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            loss = self.model(audio, video, ratio, self.generator).loss
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _warmup_step(self, audio, video, ratio) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # set_to_none first: after a capture the gradients are that graph's tensors, which
            # an eager backward would accumulate into
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._forward_backward(audio, video, ratio)
            self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture(self, inputs, ratio) -> _Captured:
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        # gradients allocated inside the capture: backward writes them and the captured
        # optimiser step reads them at the same addresses on every replay
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self._forward_backward(*inputs, ratio)
        return _Captured(graph, inputs, loss)
