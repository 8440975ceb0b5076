"""The replayers' bookkeeping (fastmavil/cuda_graph.py) on the CPU, with stand-ins for the CUDA
graph API: which calls run eagerly, which capture, which replay, the input buffers, and the
refusals. Capture and replay themselves, and their equality with eager training, are tested on
CUDA (tests/kernels/test_model_step.py)."""
import contextlib
from unittest import mock

import pytest
import torch

import fastmavil.cuda_graph as cuda_graph
from fastmavil.models import build_model

from conftest import tiny_config


class StandInGraph:
    """A capture runs its body once, as the stand-in's `graph` context does; replays count."""

    def __init__(self):
        self.replays, self.generators = 0, []

    def register_generator_state(self, generator):
        self.generators.append(generator)

    def replay(self):
        self.replays += 1


class StandInStream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def stand_ins(monkeypatch):
    """The CUDA graph and stream calls the replayers make; returns the tensors whose use on the
    current stream was recorded (record_stream)."""
    for name, value in {"CUDAGraph": StandInGraph, "graph_pool_handle": lambda: (1, 2),
                        "graph": lambda graph, **options: contextlib.nullcontext(),
                        "Stream": StandInStream, "stream": lambda s: contextlib.nullcontext(),
                        "current_stream": StandInStream}.items():
        monkeypatch.setattr(torch.cuda, name, value, raising=False)
    recorded = []
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, stream: recorded.append(t))
    return recorded


class OnCuda:
    type = "cuda"


def on_cuda():
    """Lets a replayer be built from a CPU model (its one device check)."""
    return mock.patch.object(torch.Tensor, "device", new_callable=mock.PropertyMock,
                             return_value=OnCuda())


@pytest.fixture
def batch():
    cfg = tiny_config("diffmavil")
    m = cfg.model
    torch.manual_seed(0)
    return (build_model(cfg), torch.randn(2, 1, m.audio_frames, m.mel_bins),
            torch.randn(2, 3, m.video_frames, m.video_size, m.video_size))


RATIOS = [0.75, 0.75, 0.75, 0.5, 0.5, 0.75]  # warm-up 1: eager, capture, replay ...


def replays(replayer) -> dict:
    return {key[2]: captured.graph.replays for key, captured in replayer.graphs.items()}


def test_graphed_step_warms_up_captures_and_replays_each_shape(batch, stand_ins):
    model, audio, video = batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.param_groups[0]["capturable"] = True  # checked when built (CPU steps can't be)
    with on_cuda():
        step = cuda_graph.GraphedStep(model, optimizer, torch.Generator(), autocast_dtype=None,
                                      warmup=1)
    optimizer.param_groups[0]["capturable"] = False
    losses = [step.step(audio, video, ratio) for ratio in RATIOS]
    assert all(torch.isfinite(loss) for loss in losses)
    assert list(step.eager_calls.values()) == [1, 1] and replays(step) == {0.75: 3, 0.5: 1}
    # the eager warm-ups' losses, made on a side stream, are recorded for the current one
    assert [id(t) for t in stand_ins] == [id(losses[0]), id(losses[3])]
    assert len(step.inputs) == 1  # both ratios read one pair of input buffers
    assert all(c.graph.generators == [step.generator] for c in step.graphs.values())
    other = video + 1  # a new batch of the same layout is copied into the buffers
    step.step(audio, other, 0.75)
    assert torch.equal(step.inputs[next(iter(step.inputs))][1], other)
    optimizer.param_groups[0]["lr"] = 1e-4
    with pytest.raises(ValueError, match="hyperparameters changed since the step was captured"):
        step.step(audio, video, 0.75)


@pytest.mark.usefixtures("stand_ins")
def test_graphed_passes_keep_their_gradient_buffers(batch, monkeypatch):
    model, audio, video = batch
    with on_cuda():
        passes = cuda_graph.GraphedPasses(model, torch.Generator(), autocast_dtype=None)
    buffers = [p.grad for p in model.parameters()]
    seen, real = [], cuda_graph.accumulate_pass
    monkeypatch.setattr(cuda_graph, "accumulate_pass",
                        lambda model, params, a, v, *rest: seen.append((a, v)) or
                        real(model, params, a, v, *rest))
    for ratio in RATIOS:
        loss, terms = passes(audio, video, ratio, 2)
        assert torch.isfinite(loss) and "mse_audio" in terms
    assert replays(passes) == {0.75: 3, 0.5: 1}
    # eager calls take the batch; a capture, the persistent buffers the replays read
    ((layout, buffers_in),) = passes.inputs.items()
    assert [a is audio for a, _ in seen] == [True, False, True, False]
    assert all(a is buffers_in[0] and v is buffers_in[1] for a, v in seen[1::2])
    passes(audio[:1], video[:1], 0.75, 2)  # another batch size: its own shape
    assert len(passes.inputs) == 1 and len(passes.eager_calls) == 3
    passes(audio[:1], video[:1], 0.75, 2)
    assert len(passes.inputs) == 2 and len(passes.graphs) == 3
    assert all(p.grad is g for p, g in zip(model.parameters(), buffers))
    assert any(g.abs().sum() > 0 for g in buffers)
    (flat,) = passes.buffers  # every gradient a view of one buffer: one all-reduce a step
    assert all(g.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
               for g in buffers)
    before = [g.clone() for g in buffers]

    class Halving:  # a World whose other rank's gradients are all zero
        def average_(self, tensor):
            return tensor.div_(2)
    passes.average_over(Halving())
    assert all(torch.equal(g, b / 2) for g, b in zip(buffers, before))
    passes.zero_grads()
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), buffers))
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="use GraphedPasses.zero_grads"):
        passes(audio, video, 0.75, 2)


@pytest.mark.usefixtures("stand_ins")
def test_memory_counts_the_activations_held_in_the_graph_pool(batch, monkeypatch):
    """The pool's free bytes (what replays write) come from its snapshot; the trainer logs the
    larger of the allocator's peak and what is held now, those bytes included."""
    from fastmavil.train import pretrain
    segments = [{"total_size": 100, "allocated_size": 30}, {"total_size": 50, "allocated_size": 0}]
    asked = []
    monkeypatch.setattr(torch.cuda, "memory_snapshot",
                        lambda mempool_id, include_traces: asked.append(mempool_id) or segments)
    with on_cuda():
        passes = cuda_graph.GraphedPasses(batch[0], torch.Generator(), autocast_dtype=None)
    assert passes.pool_idle_bytes() == 120 and asked == [(1, 2)]  # the stand-in pool handle
    monkeypatch.setattr(pretrain, "peak_memory_bytes", lambda device: 400)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 300)
    cuda = torch.device("cuda")
    assert pretrain._memory_held(cuda, passes) == 420
    assert pretrain._memory_held(cuda, None) == 400  # eager: the allocator's peak
    segments[0]["allocated_size"] = 100
    assert pretrain._memory_held(cuda, passes) == 400  # the peak is larger
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda **kw: {}["segments"])
    assert passes.pool_idle_bytes() is None and pretrain._memory_held(cuda, passes) == 400


def test_flat_gradients_are_views_of_one_buffer_per_dtype_in_order():
    params = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(4)),
              torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    params[1].grad = torch.full((4,), 7.0)  # a gradient it had is kept
    buffers = cuda_graph.flat_gradients(params)
    assert [(b.dtype, b.numel()) for b in buffers] == [(torch.float32, 10), (torch.float64, 3)]
    assert torch.equal(buffers[0], torch.tensor([0.0] * 6 + [7.0] * 4))
    buffers[0][:6] = torch.arange(6.0)
    assert torch.equal(params[0].grad, torch.arange(6.0).view(2, 3))
    assert params[2].grad.data_ptr() == buffers[1].data_ptr() and not params[2].grad.any()
    # a transposed parameter keeps its layout in a buffer of its own (the fused AdamW walks a
    # parameter and its gradient in the same memory order)
    transposed = torch.nn.Parameter(torch.randn(3, 2).t())
    buffers = cuda_graph.flat_gradients([params[0], transposed])
    assert len(buffers) == 2 and buffers[0] is transposed.grad
    assert transposed.grad.stride() == transposed.stride()


def test_replayers_refuse_a_cpu_model_and_a_plain_optimiser(batch):
    model = batch[0]
    with pytest.raises(ValueError, match="capturable=True"):
        cuda_graph.GraphedStep(model, torch.optim.AdamW(model.parameters()), torch.Generator())
    capturable = torch.optim.AdamW(model.parameters(), capturable=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model; this one is on cpu"):
        cuda_graph.GraphedStep(model, capturable, torch.Generator())
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model; this one is on cpu"):
        cuda_graph.GraphedPasses(model, torch.Generator())
    with on_cuda(), pytest.raises(ValueError, match="warmup must be >= 1"):
        cuda_graph.GraphedPasses(model, torch.Generator(), warmup=0)
