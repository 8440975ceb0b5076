"""The optimizer's parameter groups and gradient accumulation."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastmavil.models import build_model
from fastmavil.train.metrics import StepTimer
from fastmavil.train.pretrain import accumulate_gradients, make_optimizer

from conftest import tiny_config


@pytest.mark.parametrize("variant, block", [("diffmavil", "swin"), ("mavil", "swinv2cr")])
def test_weight_decay_skips_biases_norms_tokens_and_position_tables(variant, block):
    """MAE's groups, named from the modules rather than from the rule in make_optimizer: linear
    and patch weights decay; biases, LayerNorms, [MASK] tokens, Swin's bias table and the
    cosine blocks' temperatures do not."""
    cfg = tiny_config(variant, audio_decoder_block=block)
    model = build_model(cfg)
    decays = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            decays.add(f"{name}.weight")
    decay, no_decay = make_optimizer(cfg, model, torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == decays
    assert decay["weight_decay"] == cfg.optim.weight_decay and no_decay["weight_decay"] == 0.0
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert skipped == set(names.values()) - decays
    assert any("mask_token" in n for n in skipped) == (variant == "mavil")
    assert any(n.endswith("rel_pos_table") for n in skipped) == (block == "swin")
    assert any(n.endswith(".tau") for n in skipped) == (block == "swinv2cr")


def test_passes_of_a_step_average_to_one_pass_of_all_its_samples():
    """Two passes of 4 give the gradient, loss and terms of one pass of 8 (each pass's loss is
    divided by the passes: summed, the gradient and clipping norm would double)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    samples = torch.randn(8, 5)

    def forward(batch):
        loss = model(batch).square().mean()
        return SimpleNamespace(loss=loss, terms={"mse": loss * 2})

    grads = []
    for passes in (1, 2):
        model.zero_grad()
        batches = iter(samples.chunk(passes))
        loss, terms = accumulate_gradients(forward, batches, passes, contextlib.nullcontext(),
                                           StepTimer())
        grads.append((loss, terms["mse"], model.weight.grad.clone(), model.bias.grad.clone()))
    for one, two in zip(*grads):
        torch.testing.assert_close(two, one, rtol=1e-6, atol=1e-7)
    with pytest.raises(StopIteration):  # the data ends mid-step
        accumulate_gradients(forward, iter(samples.chunk(2)), 3, contextlib.nullcontext(),
                             StepTimer())
