"""The optimizer's parameter groups, gradient accumulation and clipping."""

import pytest
import torch
from torch import nn

from fastmavil.models import build_model
from fastmavil.train.metrics import StepTimer
from fastmavil.train.pretrain import make_optimizer
from fastmavil.train.runtime import accumulate_gradients, clip_gradients

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
    decay, no_decay = make_optimizer(cfg, model).param_groups
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

    lasts = []

    def run_pass(batch, passes, last):  # as the trainer's eager pass
        lasts.append(last)
        loss = model(batch).square().mean()
        (loss / passes).backward()
        return loss.detach(), {"mse": loss.detach() * 2}

    grads = []
    for passes in (1, 2):
        model.zero_grad()
        batches = iter(samples.chunk(passes))
        loss, terms = accumulate_gradients(lambda b, last: run_pass(b, passes, last), batches,
                                           passes, StepTimer())
        grads.append((loss, terms["mse"], model.weight.grad.clone(), model.bias.grad.clone()))
    for one, two in zip(*grads):
        torch.testing.assert_close(two, one, rtol=1e-6, atol=1e-7)
    assert lasts == [True, False, True]  # each step's last pass is told so (DDP's all-reduce)
    with pytest.raises(StopIteration):  # the data ends mid-step
        accumulate_gradients(lambda b, last: run_pass(b, 3, last), iter(samples.chunk(2)), 3,
                             StepTimer())


def test_graphed_passes_accumulate_as_backward_does():
    """fastmavil.cuda_graph.accumulate_pass, the pass GraphedPasses captures (here run eagerly,
    on the CPU), adds exactly what loss.backward() accumulates into .grad, over passes."""
    from fastmavil.cuda_graph import accumulate_pass
    cfg = tiny_config("diffmavil")
    torch.manual_seed(0)
    models = [build_model(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    audio = torch.randn(2, 1, cfg.model.audio_frames, cfg.model.mel_bins)
    video = torch.randn(2, 3, cfg.model.video_frames, cfg.model.video_size,
                        cfg.model.video_size)
    params = [p for p in models[1].parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    for ratio in (0.75, 0.5):  # two passes of a step, each loss / 2
        generator = torch.Generator().manual_seed(int(ratio * 100))
        out = models[0](audio, video, ratio, generator)
        (out.loss / 2).backward()
        generator = torch.Generator().manual_seed(int(ratio * 100))
        loss, terms = accumulate_pass(models[1], params, audio, video, ratio, generator, 2)
        torch.testing.assert_close(loss, out.loss.detach(), rtol=0, atol=0)
        assert terms.keys() == out.terms.keys()
    for (name, a), b in zip(models[1].named_parameters(), models[0].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_clipping_off_takes_the_norm_and_leaves_the_gradients_alone():
    """train.grad_clip = 0: the norm, as clip_grad_norm_ gives it, without clip_grad_norm_'s
    multiply by 1 (a read and write of every gradient; the version counter sees it)."""
    model = nn.Sequential(nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3))
    model(torch.randn(4, 7)).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    versions = [p.grad._version for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    norm = clip_gradients(model, 0.0)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    assert [p.grad._version for p in model.parameters()] == versions
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    # on: scaled to the max norm, the norm before clipping returned
    norm = clip_gradients(model, 0.5 * expected.item())
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, 0.5 * g, rtol=1e-5, atol=1e-7)
