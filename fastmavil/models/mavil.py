"""The pre-training model: MAViL, DiffMAViL and the audio-only AudioMAE (+ diffusion).

One training forward (paper Sec. 3, App. B):
  mask audio (and video) twice -> encoders over the visible patches of both views (four
  encodings, batched as two calls) -> InfoNCE inter-modal (view 1 audio vs video) and
  intra-modal (view 1 vs view 2 per modality) on mean-pooled uni-modal tokens -> fusion
  encoder over view 1 -> decoders from the fused visible latents plus [MASK] tokens or
  diffused masked patches -> MSE on the masked patches. AudioMAE variants have one view, no
  fusion and no contrastive terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config
from ..diffusion import DiffusionSchedule
from ..losses import info_nce, masked_mse, normalize_patches
from ..masking import Masking, gather_tokens, random_masking
from .attention import CrossAttention, SelfAttention
from .decoder import Decoder
from .encoder import Encoder, FusionEncoder
from .patch import patch_grid, patchify
from .pos_embed import sincos_grid
from .swin import WindowBlock


@dataclass
class PretrainOutput:
    loss: torch.Tensor                 # the weighted total
    terms: dict[str, torch.Tensor]     # mse_audio, mse_video, inter, intra (unweighted)


class MAViL(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        cfg.check()
        m, self.cfg = cfg.model, cfg
        self.audio_patch, self.video_patch = tuple(m.audio_patch), tuple(m.video_patch)
        enc = dict(dim=m.encoder_dim, depth=m.encoder_depth, heads=m.encoder_heads,
                   mlp_ratio=m.mlp_ratio, mask_first=m.mask_first, backend=m.attention)
        dec = dict(encoder_dim=m.encoder_dim, dim=m.decoder_dim, depth=m.decoder_depth,
                   heads=m.decoder_heads, mlp_ratio=m.mlp_ratio, diffusion=m.diffusion,
                   backend=m.attention)
        self.audio_encoder = Encoder(1, self.audio_patch, sincos_grid(m.encoder_dim, m.audio_grid),
                                     **enc)
        self.audio_decoder = Decoder("window", patch_dim=self.audio_patch[0] * self.audio_patch[1],
                                     pos=sincos_grid(m.decoder_dim, m.audio_grid), grid=m.audio_grid,
                                     window=m.audio_decoder_window, shift=m.audio_decoder_shift,
                                     rel_pos=m.audio_decoder_rel_pos,
                                     window_block=m.audio_decoder_block, **dec)
        if m.has_video:
            self.video_encoder = Encoder(3, self.video_patch,
                                         sincos_grid(m.encoder_dim, m.video_grid), **enc)
            self.fusion = FusionEncoder(m.encoder_dim, m.fusion_depth, m.encoder_heads,
                                        m.mlp_ratio, m.attention)
            self.video_decoder = Decoder(m.video_decoder_attention,
                                         patch_dim=3 * self.video_patch[0] * self.video_patch[1]
                                         * self.video_patch[2],
                                         pos=sincos_grid(m.decoder_dim, m.video_grid), **dec)
        self.diffusion = DiffusionSchedule(cfg.diffusion.steps, cfg.diffusion.beta_start,
                                           cfg.diffusion.beta_end, cfg.diffusion.phi) \
            if m.diffusion else None
        self.apply(_init_weights)
        self.use_kernels(False)

    @property
    def has_video(self) -> bool:
        return self.cfg.model.has_video

    @property
    def views(self) -> int:
        """Masked views per clip: two when the intra-modal contrastive term is on."""
        return 2 if self.has_video and self.cfg.loss.intra_weight > 0 else 1

    def forward(self, audio: torch.Tensor, video: torch.Tensor | None = None,
                mask_ratio: float = 0.8, generator: torch.Generator | None = None) -> PretrainOutput:
        """audio (B, 1, T, F) fbank; video (B, 3, Fr, H, W) for audio-video variants."""
        m = self.cfg.model
        _check_shape("audio", audio, (1, m.audio_frames, m.mel_bins))
        if self.has_video:
            if video is None:
                raise ValueError(f"variant {m.variant!r} needs a video batch")
            _check_shape("video", video, (3, m.video_frames, m.video_size, m.video_size))
        batch, views, loss_cfg = audio.shape[0], self.views, self.cfg.loss
        audio_ids = self._mask(audio, self.audio_patch, views, mask_ratio, generator)
        audio_unimodal = self.audio_encoder(audio, audio_ids.keep)
        terms = {}
        if not self.has_video:
            terms["mse_audio"] = self._reconstruct(self.audio_decoder, audio, self.audio_patch,
                                                   audio_unimodal, audio_ids.view(0), generator)
            return PretrainOutput(terms["mse_audio"], terms)

        video_ids = self._mask(video, self.video_patch, views, mask_ratio, generator)
        video_unimodal = self.video_encoder(video, video_ids.keep)
        audio_emb = audio_unimodal.unflatten(0, (views, batch)).mean(dim=2)  # (views, B, D)
        video_emb = video_unimodal.unflatten(0, (views, batch)).mean(dim=2)
        loss = 0.0
        if loss_cfg.inter_weight > 0:
            terms["inter"] = info_nce(audio_emb[0], video_emb[0], loss_cfg.temperature)
            loss = loss + loss_cfg.inter_weight * terms["inter"]
        if views == 2:
            terms["intra"] = 0.5 * (info_nce(audio_emb[0], audio_emb[1], loss_cfg.temperature)
                                    + info_nce(video_emb[0], video_emb[1], loss_cfg.temperature))
            loss = loss + loss_cfg.intra_weight * terms["intra"]

        audio_fused, video_fused = self.fusion(audio_unimodal[:batch], video_unimodal[:batch])
        terms["mse_audio"] = self._reconstruct(self.audio_decoder, audio, self.audio_patch,
                                               audio_fused, audio_ids.view(0), generator)
        terms["mse_video"] = self._reconstruct(self.video_decoder, video, self.video_patch,
                                               video_fused, video_ids.view(0), generator)
        return PretrainOutput(loss + terms["mse_audio"] + terms["mse_video"], terms)

    @staticmethod
    def _mask(x: torch.Tensor, patch: tuple[int, ...], views: int, ratio: float,
              generator: torch.Generator | None) -> Masking:
        num_tokens = math.prod(patch_grid(tuple(x.shape[2:]), patch))
        return random_masking((views, x.shape[0]), num_tokens, ratio, x.device, generator)

    def use_kernels(self, enabled: bool) -> None:
        """Fast path (Triton kernels) or the plain PyTorch references: the same function, but
        not the same random draws (the fused diffusion noise comes from a Philox stream seeded
        by one draw of the step's generator, the reference's from B x m x P normal draws, so
        the later draws differ too). Where triton is not installed the references run, and a
        warning says so (the kernel modules cannot even be imported there)."""
        from kernels import can_launch, triton_available
        if enabled and not triton_available():
            can_launch("fast path")  # logs why the references run
            enabled = False
        self.fused = enabled
        for encoder in (self.audio_encoder, getattr(self, "video_encoder", None)):
            if encoder is not None:
                encoder.patch_embed.fused = enabled
        for module in self.modules():  # the Swin windows, and attention under backend triton
            if isinstance(module, (WindowBlock, SelfAttention, CrossAttention)):
                module.fused = enabled

    def set_residual_dtype(self, dtype: torch.dtype | None) -> None:
        """The residual stream's dtype in every encoder and decoder (train.residual_precision):
        None leaves it as autocast does (fp32)."""
        for module in self.modules():
            if isinstance(module, (Encoder, FusionEncoder, Decoder)):
                module.residual_dtype = dtype

    def _reconstruct(self, decoder: Decoder, x: torch.Tensor, patch: tuple[int, ...],
                     latents: torch.Tensor, ids: Masking,
                     generator: torch.Generator | None) -> torch.Tensor:
        """MSE of the decoder's prediction on the masked patches (diffused inputs or [MASK])."""
        norm_pix = self.cfg.loss.norm_pix
        if self.fused:  # gather, normalise, diffuse, project and score without copies
            from kernels.diffuse_embed import diffuse_embed_masked
            from kernels.masked_mse import masked_patch_mse
            masked = None
            if self.diffusion is not None:
                # One t per sample, drawn per modality: the paper does not say they share it.
                t = self.diffusion.sample_timesteps(x.shape[0], x.device, generator)
                seed = torch.randint(2 ** 31 - 1, (1,), device=x.device, generator=generator)
                embed = decoder.noisy_embed
                masked = diffuse_embed_masked(
                    x, ids.mask, t, self.diffusion.alpha_bar,
                    embed.weight.view(embed.out_features, x.shape[1], *patch), embed.bias,
                    decoder.pos, patch, norm_pix, seed=seed)
            pred = decoder(latents, ids, masked=masked)
            return masked_patch_mse(pred, x, ids.mask, patch, norm_pix)
        target = gather_tokens(patchify(x, patch), ids.mask)  # (B, m, P)
        if norm_pix:
            target = normalize_patches(target)
        noisy = None
        if self.diffusion is not None:  # t per sample and modality, as the fused path
            t = self.diffusion.sample_timesteps(x.shape[0], x.device, generator)
            noisy = self.diffusion.q_sample(target, t, self._noise(target, generator))
        return masked_mse(decoder(latents, ids, noisy), target)

    @staticmethod
    def _noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(like.shape, device=like.device, dtype=like.dtype, generator=generator)


def _check_shape(name: str, x: torch.Tensor, expected: tuple[int, ...]) -> None:
    if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"{name} batch has shape {tuple(x.shape)}; the model config expects "
                         f"(B, {', '.join(map(str, expected))})")


def _init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linear and patch weights, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def build_model(cfg: Config) -> MAViL:
    return MAViL(cfg)
