"""Regional compilation (fastmavil.models.compile_blocks)."""
import torch
from torch import nn

from conftest import tiny_config
from fastmavil.models import build_model, compile_blocks
from fastmavil.models.attention import Block
from fastmavil.models.compile import BLOCKS


def test_every_transformer_block_is_compiled_and_nothing_else(monkeypatch):
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    model = build_model(tiny_config())  # DiffMAViL: ViT, fusion, cross and Swin blocks
    assert compile_blocks(model) == len(compiled) > 0
    assert {type(m) for m in compiled} == set(BLOCKS)
    assert len(compiled) == sum(isinstance(m, BLOCKS) for m in model.modules())


def test_compiled_block_equals_eager_forward_and_backward():
    from torch._dynamo.utils import counters
    counters.clear()
    torch.manual_seed(0)
    eager = Block(32, 2, backend="sdpa")
    compiled = Block(32, 2, backend="sdpa")
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    for tokens in (7, 12):  # a second length: the masking ratio changes between epochs
        x = torch.randn(3, tokens, 32)
        grad = torch.randn(3, tokens, 32)
        outs = []
        for block in (eager, compiled):
            block.zero_grad()
            out = block(x)
            out.backward(grad)
            outs.append((out, [p.grad.clone() for p in block.parameters()]))
        (a, ga), (b, gb) = outs
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        for g, h in zip(gb, ga):
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1  # really compiled, not run eagerly
