"""Regional compilation (fastmavil.models.compile_blocks)."""
import pytest
import torch
from torch import nn

from conftest import tiny_batch, tiny_config
from fastmavil.models import build_model, compile_blocks
from fastmavil.models.attention import Block, CrossBlock
from fastmavil.models.compile import BLOCKS
from fastmavil.models.swin import CosineWindowBlock, WindowBlock


def test_every_transformer_block_is_compiled_and_nothing_else(monkeypatch):
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append((self, k)))
    model = build_model(tiny_config())  # DiffMAViL: ViT, fusion, cross and Swin blocks
    assert compile_blocks(model) == len(compiled) > 0
    assert {type(m) for m, _ in compiled} == set(BLOCKS)
    assert len(compiled) == sum(isinstance(m, BLOCKS) for m in model.modules())
    assert all(k == {"dynamic": True, "mode": "default"} for _, k in compiled)
    compiled.clear()
    compile_blocks(model, "max-autotune")
    assert all(k["mode"] == "max-autotune-no-cudagraphs" for _, k in compiled)
    with pytest.raises(ValueError, match="'fast' is not one of: default, max-autotune"):
        compile_blocks(model, "fast")


def _block_and_inputs(kind: str, batch: int, tokens: int):
    """A small block of each kind and its inputs; the Swin block's grid is (tokens/4, 4)."""
    if kind == "vit":
        return Block(32, 2, backend="sdpa"), (torch.randn(batch, tokens, 32),)
    if kind == "cross":
        return CrossBlock(32, 2, backend="sdpa"), (torch.randn(batch, tokens, 32),
                                                   torch.randn(batch, 5, 32))
    block_type = {"swin": WindowBlock, "swinv2cr": CosineWindowBlock}[kind]
    block = block_type(32, 2, grid=(tokens // 4, 4), window=(2, 2), shift=(1, 1),
                       backend="sdpa")
    # eval: the cosine block's position MLP has dropout, which two runs would draw differently
    return block.eval() if kind == "swinv2cr" else block, (torch.randn(batch, tokens, 32),)


@pytest.mark.parametrize("kind, lengths, mode", [
    ("vit", (7, 12), "default"), ("cross", (7, 12), "default"), ("swin", (16, 16), "default"),
    ("swinv2cr", (16, 16), "default"), ("vit", (7, 12), "max-autotune")])
def test_compiled_block_equals_eager_forward_and_backward(kind, lengths, mode):
    """Compiled vs eager block, forward and parameter gradients; ViT and cross blocks at a
    second token count too (the masking ratio changes between epochs); a ViT block in
    max-autotune too (on a CPU Inductor's matmul choices differ, but the mode runs end to end)."""
    from torch._dynamo.utils import counters
    counters.clear()
    torch.manual_seed(0)
    eager, _ = _block_and_inputs(kind, 3, lengths[0])
    compiled, _ = _block_and_inputs(kind, 3, lengths[0])
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled, mode)
    for tokens in lengths:
        _, inputs = _block_and_inputs(kind, 3, tokens)
        grad = torch.randn(3, tokens, 32)
        outs = []
        for block in (eager, compiled):
            block.zero_grad()
            out = block(*inputs)
            out.backward(grad)
            outs.append((out, [p.grad.clone() for p in block.parameters()]))
        (a, ga), (b, gb) = outs
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        for g, h in zip(gb, ga):
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5)
    # really compiled, not run eagerly; one graph for both token counts (dynamic shapes)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("attention", ["cross", "self"])
def test_one_graph_per_block_variant_over_batches_and_ratios(monkeypatch, attention):
    """Training steps of a tiny DiffMAViL at two batch sizes and two masking ratios (the adaptive
    batch curriculum) trace one graph per block variant: ViT (encoders and fusion), the video
    decoder's (cross or self) and the Swin block unshifted and shifted. A shape or a view that
    made a block recompile would add one. Dynamo alone (the eager backend): the count is the
    point, not the code."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compile_ = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile",
                        lambda self, *a, **k: compile_(self, *a, backend="eager", **k))
    model = build_model(tiny_config(attention=attention))
    compile_blocks(model)
    generator = torch.Generator().manual_seed(0)
    for batch, ratio in ((3, 0.8), (5, 0.9)):
        model(*tiny_batch(model.cfg, batch), ratio, generator).loss.backward()
    # ViT, Swin x 2, plus the cross block (with self-attention the decoder's blocks are ViTs)
    assert counters["stats"]["unique_graphs"] == (4 if attention == "cross" else 3)


def test_max_autotune_trains_over_batches_with_the_kernels():
    """max-autotune with the kernels on (on a CPU through the interpreter): a tiny DiffMAViL
    runs forward and backward at two batch sizes and ratios, and its compiled backward keeps up
    with the new shape (the Swin decoder's SDPA path, without the kernels, fails there with
    torch 2.13: the trainer refuses that combination)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(tiny_config())
    model.use_kernels(True)
    assert model.fused
    compile_blocks(model, "max-autotune")
    generator = torch.Generator().manual_seed(0)
    for batch, ratio in ((4, 0.9), (2, 0.8)):
        model.zero_grad()
        out = model(*tiny_batch(model.cfg, batch), ratio, generator)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in model.parameters() if p.requires_grad)
