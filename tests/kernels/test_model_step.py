"""A whole training step of a small DiffMAViL with the kernels on equals the reference step."""
import contextlib

import pytest
import torch

import kernels
import kernels.attention as sequence_attention
import kernels.diffuse_embed as diffuse_embed
import kernels.masked_mse as masked_mse
import kernels.patch_embed as patch_embed
import kernels.window_attention as window_attention
from fastmavil.config import Config, ModelConfig
from fastmavil.diffusion import DiffusionSchedule
from fastmavil.models import MAViL, build_model


def small_config(variant, norm_pix=True, **model):
    cfg = Config(model=ModelConfig(variant=variant, size="tiny", encoder_dim=32, encoder_heads=2,
                                   encoder_depth=1, decoder_dim=32, decoder_depth=2,
                                   decoder_heads=2, audio_frames=64, mel_bins=64,
                                   video_frames=4, video_size=32,
                                   audio_decoder_window=(2, 2), audio_decoder_shift=(1, 0),
                                   **model))
    cfg.loss.norm_pix = norm_pix
    return cfg.check()


# Natively on CUDA where there is one (fp32, TF32 off), else through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-4, atol=1e-5) if DEVICE == "cuda" else dict(rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("true_fp32")  # tests/conftest.py: TF32 off on CUDA
@pytest.mark.parametrize("variant, options", [
    ("diffmavil", {}), ("mavil", {}), ("audiomae_diff", {}), ("audiomae", {}),
    ("diffmavil", dict(audio_decoder_block="swinv2cr")),
    ("diffmavil", dict(video_decoder_attention="self")), ("diffmavil", dict(norm_pix=False)),
    ("diffmavil", dict(attention="triton")), ("mavil", dict(attention="triton",
                                                          video_decoder_attention="self"))],
    ids=["diffmavil", "mavil", "audiomae_diff", "audiomae", "swinv2cr", "self-decoder", "no-norm-pix",
         "triton-attention", "mavil-triton-attention"])
def test_fast_step_equals_reference_step(variant, options, monkeypatch):
    monkeypatch.setattr(kernels, "_warned", set())  # names of kernels that fell back
    torch.manual_seed(0)
    cfg = small_config(variant, **options)
    reference = build_model(cfg).to(DEVICE)
    fast = build_model(cfg).to(DEVICE)
    fast.load_state_dict(reference.state_dict())
    fast.use_kernels(True)
    audio = torch.randn(2, 1, 64, 64, device=DEVICE)
    video = torch.randn(2, 3, 4, 32, 32, device=DEVICE) if cfg.model.has_video else None

    # identical randomness on both paths: the same timesteps (one draw per diffused modality),
    # explicit noise instead of the seed
    noises = {}

    def noise_for(shape):
        return noises.setdefault(tuple(shape), torch.randn(shape, device=DEVICE))

    real, calls = diffuse_embed.diffuse_embed_masked, []

    def with_noise(x, ids, t, alpha_bar, weight, bias, pos, patch, norm_pix, seed=None):
        calls.append(seed)
        return real(x, ids, t, alpha_bar, weight, bias, pos, patch, norm_pix,
                    noise=noise_for((ids.shape[0], ids.shape[1], weight[0].numel())))
    monkeypatch.setattr(diffuse_embed, "diffuse_embed_masked", with_noise)
    monkeypatch.setattr(MAViL, "_noise", staticmethod(lambda like, g: noise_for(like.shape)))
    real_windows, windowed = window_attention.window_attention, []
    monkeypatch.setattr(window_attention, "window_attention",
                        lambda *a: windowed.append(a) or real_windows(*a))
    launched = {"patch_embed": 0, "masked_mse": 0}  # the other kernels' calls
    for module, name, key in ((patch_embed, "patch_embed_visible", "patch_embed"),
                              (masked_mse, "masked_patch_mse", "masked_mse")):
        op = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, op=op, key=key, **k: launched.update(
            {key: launched[key] + 1}) or op(*a, **k))
    sequences = []  # backend triton: the encoders' and the video decoder's attention
    for name in ("self_attention", "cross_attention"):
        op = getattr(sequence_attention, name)
        monkeypatch.setattr(sequence_attention, name,
                            lambda *a, op=op, name=name: sequences.append(name) or op(*a))

    outs = []
    for model in (reference, fast):
        timesteps = iter([torch.tensor([1, 1000], device=DEVICE),
                          torch.tensor([500, 7], device=DEVICE)])
        monkeypatch.setattr(DiffusionSchedule, "sample_timesteps",
                            lambda *a, steps=timesteps, **k: next(steps))
        torch.manual_seed(1)  # the same dropout masks (swinv2cr's) on both paths
        out = model(audio, video, 0.75, generator=torch.Generator(DEVICE).manual_seed(3))
        out.loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_out, ref_grads), (fast_out, fast_grads) = outs
    diffused = {"diffmavil": 2, "audiomae_diff": 1}.get(variant, 0)  # modalities
    assert len(calls) == diffused  # the fused path was taken
    modalities = 2 if cfg.model.has_video else 1
    mask_first_views = reference.views if cfg.model.mask_first else 0  # a launch per view
    assert launched == {"patch_embed": modalities * mask_first_views, "masked_mse": modalities}
    assert len(windowed) == cfg.model.decoder_depth  # the Swin decoder's windows, in Triton
    m = cfg.model  # the reference path (kernels off) never calls the sequence kernels
    assert len(sequences) == (0 if m.attention != "triton" else 2 * m.encoder_depth
                              + m.fusion_depth + m.decoder_depth)
    assert not kernels._warned  # and its kernels launched: none fell back to its reference
    for key in ref_out.terms:
        torch.testing.assert_close(fast_out.terms[key], ref_out.terms[key], **TOL)
    torch.testing.assert_close(fast_out.loss, ref_out.loss, **TOL)
    for name, grad in ref_grads.items():
        scale = grad.abs().max().item() + 1e-12
        torch.testing.assert_close(fast_grads[name], grad, rtol=10 * TOL["rtol"],
                                   atol=10 * TOL["atol"] * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: copy streams are a "
                    "CUDA matter (on a CPU to_device takes no stream)")
def test_to_device_on_a_copy_stream_makes_the_current_stream_wait_for_it():
    """The trainer copies each batch on a side stream: work queued on the current stream right
    after reads the whole batch, even while the copy stream is still busy with earlier work
    (without the wait, the sums below would read the batch before the copy wrote it)."""
    from fastmavil.data.loader import LoaderSpec, to_device
    cuda = torch.device("cuda")
    batch = {"audio": torch.randn(4, 1, 128, 64).pin_memory(),
             "video": torch.randint(0, 256, (4, 3, 4, 32, 32), dtype=torch.uint8).pin_memory()}
    expected = to_device(batch, cuda, LoaderSpec())
    torch.cuda.synchronize()
    copy_stream = torch.cuda.Stream(cuda)
    with torch.cuda.stream(copy_stream):  # keeps the copy stream busy before the batch's copy
        busy = torch.randn(4096, 4096, device=cuda)
        for _ in range(20):
            busy = busy @ busy / 64
    audio, video = to_device(batch, cuda, LoaderSpec(), copy_stream)
    sums = audio.sum(), video.sum()  # queued on the current stream
    assert torch.equal(sums[0], expected[0].sum()) and torch.equal(sums[1], expected[1].sum())
    assert torch.equal(audio, expected[0]) and torch.equal(video, expected[1])


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_available()),
                    reason="needs a CUDA GPU and triton: host synchronisation is a CUDA matter")
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_fast_training_step_never_waits_for_the_device(backend):
    """The step the trainer runs (a pinned batch moved on a copy stream and its uint8 video
    normalised on the device, bf16 autocast, kernels, SDPA or the Triton sequence attention,
    gradient norm, fused AdamW with an on-device skip) queues work without a host sync, so the
    host can run ahead of the GPU."""
    from fastmavil.data.loader import LoaderSpec, to_device
    from fastmavil.models.attention import set_attention_backend
    torch.manual_seed(0)
    model = build_model(small_config("diffmavil")).cuda()
    model.use_kernels(True)
    set_attention_backend(model, backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = {"audio": torch.randn(2, 1, 64, 64).pin_memory(),  # as the loader's pinned batches
             "video": torch.randint(0, 256, (2, 3, 4, 32, 32), dtype=torch.uint8).pin_memory()}
    generator = torch.Generator("cuda").manual_seed(0)
    copy_stream = torch.cuda.Stream()

    def step():
        audio, video = to_device(batch, torch.device("cuda"), LoaderSpec(), copy_stream)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(audio, video, 0.75, generator)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        optimizer.found_inf = (~(torch.isfinite(out.loss) & torch.isfinite(grad_norm))).float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # first calls compile, autotune (which times on the device) and initialise lazily
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def twin_cuda_models(backend: str = "sdpa"):
    """Two small DiffMAViLs on CUDA with the same weights, kernels on, SDPA attention (or
    `backend`)."""
    from fastmavil.models.attention import set_attention_backend
    torch.manual_seed(0)
    models = [build_model(small_config("diffmavil")).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        model.use_kernels(True)
        set_attention_backend(model, backend)
    return models


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_available()),
                    reason="needs a CUDA GPU and triton: CUDA graphs are a CUDA matter")
@pytest.mark.usefixtures("true_fp32")
def test_graphed_steps_equal_eager_steps():
    """Steps replayed from CUDA graphs (two shapes sharing one memory pool, an eager warm-up
    step after the first capture) train exactly as eager steps do: same losses, same weights.
    Same randomness too: masking, timesteps and the kernels' noise seed come from the
    generator registered with each graph, dropout from the default one."""
    from fastmavil.cuda_graph import GraphedStep
    models = twin_cuda_models()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True, capturable=True)
                  for m in models]
    audio = torch.randn(2, 1, 64, 64, device="cuda")
    video = torch.randn(2, 3, 4, 32, 32, device="cuda")
    ratios = [0.75, 0.75, 0.75, 0.5, 0.5, 0.75, 0.5]

    torch.cuda.manual_seed(1)
    generator = torch.Generator("cuda").manual_seed(0)
    eager = []
    for ratio in ratios:
        loss = models[0](audio, video, ratio, generator).loss
        loss.backward()
        optimizers[0].step()
        optimizers[0].zero_grad(set_to_none=True)
        eager.append(loss.item())

    torch.cuda.manual_seed(1)
    graphed = GraphedStep(models[1], optimizers[1], torch.Generator("cuda").manual_seed(0),
                          autocast_dtype=None, warmup=1)
    replayed = [graphed.step(audio, video, ratio).item() for ratio in ratios]
    assert len(graphed.graphs) == 2 and graphed.eager_calls == {
        key: 1 for key in graphed.graphs}
    torch.testing.assert_close(torch.tensor(replayed), torch.tensor(eager), **TOL)
    for (name, a), b in zip(models[1].named_parameters(), models[0].parameters()):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    optimizers[1].param_groups[0]["lr"] = 1e-4  # a schedule's change the graphs cannot see
    with pytest.raises(ValueError, match="hyperparameters changed since the step was captured"):
        graphed.step(audio, video, 0.75)


@pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_available()),
                    reason="needs a CUDA GPU and triton: CUDA graphs are a CUDA matter")
@pytest.mark.usefixtures("true_fp32")
@pytest.mark.parametrize("autocast, residual, backend", [
    (None, None, "sdpa"), (torch.bfloat16, None, "sdpa"), (torch.bfloat16, torch.bfloat16, "sdpa"),
    (torch.bfloat16, torch.bfloat16, "triton")],
    ids=["fp32", "bf16-autocast", "bf16-residual", "bf16-residual-triton-attention"])
def test_graphed_passes_train_as_the_eager_trainer_does(autocast, residual, backend):
    """The trainer's passes replayed from CUDA graphs (fastmavil.cuda_graph.GraphedPasses): two
    passes a step accumulated into fixed gradient buffers, clipping and the fused AdamW step
    eager between them, the lr changed every step; the same losses, gradient norms and weights
    as eager passes with loss.backward(), in fp32 and under bf16 autocast (the trainer's CUDA
    setting; the graphs' autocast keeps no weight-cast cache, the eager one does), there also
    with the residual stream in bf16 (train.residual_precision), and with the Triton sequence
    attention (model.attention = "triton")."""
    from fastmavil.cuda_graph import GraphedPasses
    models = twin_cuda_models(backend)
    for model in models:
        model.set_residual_dtype(residual)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in models]
    batches = [(torch.randn(2, 1, 64, 64, device="cuda"),
                torch.randn(2, 3, 4, 32, 32, device="cuda")) for _ in range(2)]
    ratios = [0.75, 0.75, 0.75, 0.5, 0.5, 0.75]  # per step; 2 passes each
    passes = GraphedPasses(models[1], torch.Generator("cuda").manual_seed(0),
                           autocast_dtype=autocast, warmup=1)
    generator = torch.Generator("cuda").manual_seed(0)
    eager_autocast = (torch.autocast("cuda", dtype=autocast) if autocast
                      else contextlib.nullcontext())
    seen = {"eager": [], "graphed": []}  # losses of each pass, gradient norm of each step
    for path, model, optimizer in (("eager", models[0], optimizers[0]),
                                   ("graphed", models[1], optimizers[1])):
        torch.cuda.manual_seed(1)
        for step, ratio in enumerate(ratios):
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 / (step + 1)
            for audio, video in batches:
                if path == "eager":
                    with eager_autocast:
                        out = model(audio, video, ratio, generator)
                    (out.loss / 2).backward()
                    seen[path].append(out.loss.item())
                else:
                    seen[path].append(passes(audio, video, ratio, 2)[0].item())
            # a wrong gradient scale would barely move AdamW's update, but moves the norm
            seen[path].append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
            optimizer.step()
            if path == "eager":
                optimizer.zero_grad(set_to_none=True)
            else:
                passes.zero_grads()
    assert len(passes.graphs) == 2
    assert passes.pool_idle_bytes() > 0  # the activations the replays write
    # bf16: the same kernels on both paths, so tight on the weights too (six AdamW steps move
    # a weight by at most ~2.5e-3, which a loose atol would hide)
    tol = TOL if autocast is None else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(torch.tensor(seen["graphed"]), torch.tensor(seen["eager"]), **tol)
    weight_tol = TOL if autocast is None else dict(rtol=1e-3, atol=1e-4)
    for (name, a), b in zip(models[1].named_parameters(), models[0].parameters()):
        torch.testing.assert_close(a, b, **weight_tol, msg=lambda m, name=name: f"{name}: {m}")
    models[1].zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="use GraphedPasses.zero_grads"):
        passes(*batches[0], 0.75, 2)
