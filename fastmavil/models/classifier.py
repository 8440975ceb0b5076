"""The fine-tuning model: the pre-trained audio encoder with a linear classifier on its tokens.

As AudioMAE fine-tunes (its global pool, MAE's ViT): every patch of the fbank is embedded (no
masking), the ViT blocks run with stochastic depth, the tokens are mean-pooled and normalised
by a fresh LayerNorm (`fc_norm`, in place of the encoder's final norm) and a linear head, its
weights drawn with std 2e-5, gives the logits. The positions are the fixed sin-cos grid of the
fine-tuning input's length (ESC-50's 512 frames, SPC-v2's 128), so nothing is interpolated.
"""
from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from .attention import CrossAttention, SelfAttention, layer_norm
from .encoder import Encoder
from .pos_embed import sincos_grid

log = logging.getLogger("fastmavil.finetune")

# What must match between the pre-trained and the fine-tuned encoder (the input length may not).
ENCODER_KEYS = ("encoder_dim", "encoder_depth", "encoder_heads", "mlp_ratio", "audio_patch",
                "mel_bins")


class AudioClassifier(nn.Module):
    def __init__(self, m: ModelConfig, num_classes: int, drop_path: float = 0.0):
        super().__init__()
        m.check(decoders=False)
        if num_classes < 1:
            raise ConfigError("the dataset names no labels: fine-tuning needs labelled clips "
                              "(its index.json's \"labels\")")
        self.model_cfg = m
        self.encoder = Encoder(1, tuple(m.audio_patch), sincos_grid(m.encoder_dim, m.audio_grid),
                               m.encoder_dim, m.encoder_depth, m.encoder_heads, m.mlp_ratio,
                               mask_first=False, backend=m.attention, drop_path=drop_path)
        self.encoder.norm = nn.Identity()  # replaced by fc_norm after the pooling
        self.fc_norm = layer_norm(m.encoder_dim)
        self.head = nn.Linear(m.encoder_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (B, 1, T, F) normalised fbank -> logits (B, classes)."""
        m = self.model_cfg
        if audio.dim() != 4 or tuple(audio.shape[1:]) != (1, m.audio_frames, m.mel_bins):
            raise ValueError(f"audio batch has shape {tuple(audio.shape)}; the model expects "
                             f"(B, 1, {m.audio_frames}, {m.mel_bins})")
        pooled = self.encoder(audio).mean(dim=1)
        # the head in fp32 even under autocast: bf16 logits (8 bits of mantissa) tie clips
        # that rank apart, and mAP counts ties as one threshold
        with torch.autocast(audio.device.type, enabled=False):
            return self.head(self.fc_norm(pooled.float()))

    def use_kernels(self, enabled: bool) -> None:
        """The Triton attention under model.attention = "triton" (the patch embedding of every
        token is a convolution: the fused kernels embed visible tokens only)."""
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention)):
                module.fused = enabled

    @property
    def num_layers(self) -> int:
        """Layer ids for the lr decay: 0 the embedding, 1..depth the blocks, depth + 1 the head."""
        return len(self.encoder.blocks) + 1

    def layer_id(self, name: str) -> int:
        if name.startswith("encoder.patch_embed"):
            return 0
        if name.startswith("encoder.blocks."):
            return int(name.split(".")[2]) + 1
        return self.num_layers  # fc_norm, head


def param_groups(model: AudioClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with layer-wise lr decay (BEiT, as MAE and AudioMAE fine-tune): a parameter
    of layer l learns at lr * layer_decay ** (L - l), L = the head's layer, so the patch
    embedding moves least; biases and norms take no weight decay. Each group's `lr_scale`
    multiplies the scheduled lr."""
    groups: dict[tuple[int, bool], dict] = {}
    top = model.num_layers
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decays = model.layer_id(name), p.ndim >= 2
        group = groups.setdefault((layer, decays), {
            "params": [], "weight_decay": weight_decay if decays else 0.0,
            "lr_scale": layer_decay ** (top - layer), "layer": layer})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def read_pretrained(path: str | Path) -> tuple[Path, dict]:
    """(checkpoint file, its state) for finetune.checkpoint: a .pt file, or a run folder whose
    newest complete checkpoint is taken."""
    from ..train.checkpoint import load_latest
    path = Path(path)
    if path.is_dir():
        found = load_latest(path, owner=False)  # its run may still be training
        if found is None:
            raise ConfigError(f"finetune.checkpoint = '{path}': no checkpoint in "
                              f"{path / 'checkpoints'} (has its pre-training run started?)")
        return found
    if not path.is_file():
        raise ConfigError(f"finetune.checkpoint = '{path}' does not exist: name a fastmavil-train "
                          "run folder or checkpoint file (configs/finetune/demo.toml's is the "
                          "one `fastmavil-train configs/demo.toml` writes)")
    try:
        return path, torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged or foreign file
        raise ConfigError(f"finetune.checkpoint = '{path}' does not load: "
                          f"{type(err).__name__}: {err}") from None


def load_pretrained_encoder(model: AudioClassifier, path: str | Path) -> Path:
    """Loads the audio encoder of a fastmavil-train checkpoint into `model`; every encoder
    weight must be found and fit. Returns the checkpoint file read."""
    from ..train.resume import FORMAT
    file, state = read_pretrained(path)
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise ConfigError(f"finetune.checkpoint = '{file}' is not a fastmavil-train checkpoint "
                          "(no model state)")
    if state.get("format", 1) != FORMAT:
        raise ConfigError(f"finetune.checkpoint = '{file}' has checkpoint format "
                          f"{state.get('format', 1)}, this fastmavil reads {FORMAT}: its encoder "
                          "learned other fixed positions (fastmavil/train/resume.py, FORMAT)")
    saved_cfg = state.get("config")
    if saved_cfg:  # name a size mismatch by its config key rather than by a tensor shape
        saved = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in tomllib.loads(saved_cfg)["model"].items()
                               if k in ModelConfig.__dataclass_fields__})
        differ = [f"model.{k}: {getattr(saved, k)!r} there, {getattr(model.model_cfg, k)!r} here"
                  for k in ENCODER_KEYS
                  if tuple_or(getattr(saved, k)) != tuple_or(getattr(model.model_cfg, k))]
        if differ:
            raise ConfigError(f"finetune.checkpoint = '{file}' holds another audio encoder ("
                              + "; ".join(differ) + "): set the fine-tuning config's model "
                              "keys (e.g. --model.size) to the pre-training run's")
    prefix = "audio_encoder."
    encoder = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    encoder = {k: v for k, v in encoder.items() if not k.startswith("norm.")}  # -> fc_norm
    if not encoder:
        raise ConfigError(f"finetune.checkpoint = '{file}' holds no audio encoder weights")
    missing, unexpected = model.encoder.load_state_dict(encoder, strict=False)
    if missing or unexpected:
        raise ConfigError(f"finetune.checkpoint = '{file}': audio encoder weights missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}")
    log.info("loaded the audio encoder of %s (step %s)", file, state.get("step", "?"))
    return file


def tuple_or(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value
