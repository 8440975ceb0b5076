"""One dataclass tree is the config; TOML sections map 1:1 onto it.

    [model]      what to build (variant, sizes, attention)      -> ModelConfig
    [data]       shards, feature normalisation, loader           -> DataConfig
    [mask]       masking-ratio schedule over epochs              -> MaskConfig
    [diffusion]  noise schedule of the diffused decoder inputs   -> DiffusionConfig
    [loss]       reconstruction and contrastive terms            -> LossConfig
    [optim]      the paper's Table 4 optimiser recipe            -> OptimConfig
    [train]      epochs, batch schedule, loop switches           -> TrainConfig
    [run]        where the run directory goes                    -> RunConfig

Fine-tuning (fastmavil-finetune) reads a FinetuneConfig: the same [model], [data], [optim],
[train] and [run] sections, and [finetune] (the task, its augmentations, layer-wise lr decay)
in place of [mask], [diffusion] and [loss].

Unknown keys and bad values fail with one line naming the file, the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

VARIANTS = ("mavil", "diffmavil", "audiomae", "audiomae_diff")
ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "math", "triton")

# Size presets: `base` is the paper's (ViT-B encoders, 512-d decoders, AudioSet inputs); the
# smaller ones share every line of model code and exist for CPU tests and demos.
SIZES: dict[str, dict] = {
    "base": dict(encoder_dim=768, encoder_depth=12, encoder_heads=12,
                 decoder_dim=512, decoder_depth=8, decoder_heads=16,
                 audio_frames=1024, mel_bins=128, video_frames=16, video_size=224),
    "small": dict(encoder_dim=192, encoder_depth=4, encoder_heads=3,
                  decoder_dim=128, decoder_depth=2, decoder_heads=4,
                  audio_frames=256, mel_bins=128, video_frames=8, video_size=64),
    "tiny": dict(encoder_dim=64, encoder_depth=2, encoder_heads=2,
                 decoder_dim=64, decoder_depth=2, decoder_heads=2,
                 audio_frames=128, mel_bins=128, video_frames=4, video_size=48),
}


# How command-line overrides are written, for the commands' --help.
OVERRIDE_SYNTAX = ("Values are written as in TOML: --train.compile true, --optim.betas "
                   "'[0.9, 0.95]'; strings bare: --run.name exp1.")


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a bad value."""


def _choices(*values):
    return {"choices": values}


@dataclass
class ModelConfig:
    variant: str = field(default="diffmavil", metadata=_choices(*VARIANTS))
    # Preset for the fields left at None below; explicit keys override it.
    size: str = field(default="base", metadata=_choices(*SIZES))
    video_decoder_attention: str = field(default="cross", metadata=_choices("self", "cross"))
    # auto: flash-attn where it applies (CUDA, bf16/fp16), else PyTorch SDPA; math: reference;
    # triton: kernels/attention.py with the kernels on (else auto's choice)
    attention: str = field(default="auto", metadata=_choices(*ATTENTION_BACKENDS))
    encoder_dim: int | None = None
    encoder_depth: int | None = None
    encoder_heads: int | None = None
    fusion_depth: int = 2
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    mlp_ratio: float = 4.0
    audio_frames: int | None = None
    mel_bins: int | None = None
    audio_patch: tuple[int, int] = (16, 16)
    video_frames: int | None = None
    video_size: int | None = None
    video_patch: tuple[int, int, int] = (2, 16, 16)
    # Swin-style audio decoder: window over the (time, frequency) token grid; odd blocks shift
    # by `audio_decoder_shift` (AudioMAE: 4x4 windows shifted along time).
    audio_decoder_window: tuple[int, int] = (4, 4)
    audio_decoder_shift: tuple[int, int] = (2, 0)
    audio_decoder_rel_pos: bool = True
    # `swin`: Swin (v1) pre-norm blocks; `swinv2cr`: AudioMAE's (timm Swin-V2-CR: post-norm,
    # scaled cosine attention, MLP position bias). See fastmavil/models/swin.py.
    audio_decoder_block: str = field(default="swin", metadata=_choices("swin", "swinv2cr"))
    # Fast path: Triton kernels where they exist (env FASTMAVIL_KERNELS wins, see kernels/).
    kernels: bool = True

    def __post_init__(self):
        for key, value in SIZES.get(self.size, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    @property
    def has_video(self) -> bool:
        return self.variant in ("mavil", "diffmavil")

    @property
    def diffusion(self) -> bool:
        """Diffused masked patches (DiffMAE-style) instead of learned [MASK] tokens."""
        return self.variant in ("diffmavil", "audiomae_diff")

    @property
    def mask_first(self) -> bool:
        """Mask first and project only visible patches (DiffMAViL), else project all (MAViL)."""
        return self.diffusion

    @property
    def audio_grid(self) -> tuple[int, int]:
        return (self.audio_frames // self.audio_patch[0], self.mel_bins // self.audio_patch[1])

    @property
    def video_grid(self) -> tuple[int, int, int]:
        t, h, w = self.video_patch
        return (self.video_frames // t, self.video_size // h, self.video_size // w)

    def visible_tokens(self, ratio: float) -> tuple[int, ...]:
        """Visible tokens per sample at mask ratio `ratio`: (audio,) or (audio, video)."""
        from .masking import num_visible
        grids = [self.audio_grid] + ([self.video_grid] if self.has_video else [])
        return tuple(num_visible(math.prod(g), ratio) for g in grids)

    def check(self, decoders: bool = True) -> None:
        """`decoders`: the decoders' sizes and windows too (fine-tuning builds none)."""
        for key in ("encoder_dim", "encoder_depth", "encoder_heads", "decoder_dim",
                    "decoder_depth", "decoder_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} = {getattr(self, key)} must be >= 1")
        if self.fusion_depth < 0:
            raise ConfigError(f"model.fusion_depth = {self.fusion_depth} must be >= 0")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"model.mlp_ratio = {self.mlp_ratio} must be > 0")
        for key in ("audio_patch", "video_patch"):
            if min(getattr(self, key)) < 1:
                raise ConfigError(f"model.{key} = {list(getattr(self, key))} must hold sizes >= 1")
        for dim, heads in (("encoder_dim", "encoder_heads"), ("decoder_dim", "decoder_heads")):
            d, h = getattr(self, dim), getattr(self, heads)
            if d % h or d % 4:
                raise ConfigError(f"model.{dim} = {d} must be divisible by model.{heads} = {h} "
                                  "and by 4 (sin-cos positional embedding)")
        for key, size, patch in (("audio_frames", self.audio_frames, self.audio_patch[0]),
                                 ("mel_bins", self.mel_bins, self.audio_patch[1]),
                                 ("video_frames", self.video_frames, self.video_patch[0]),
                                 ("video_size", self.video_size, self.video_patch[1]),
                                 ("video_size", self.video_size, self.video_patch[2])):
            if size <= 0 or size % patch:
                raise ConfigError(f"model.{key} = {size} must be a positive multiple of the "
                                  f"patch size {patch}")
        if not decoders:
            return
        for axis, (g, w) in enumerate(zip(self.audio_grid, self.audio_decoder_window)):
            if w <= 0 or g % min(w, g):
                raise ConfigError(f"model.audio_decoder_window = {list(self.audio_decoder_window)}"
                                  f" must tile the audio token grid {list(self.audio_grid)}")
            if not 0 <= self.audio_decoder_shift[axis] < min(w, g) or (
                    self.audio_decoder_shift[axis] and w >= g):
                raise ConfigError(f"model.audio_decoder_shift = {list(self.audio_decoder_shift)} "
                                  "must lie in [0, window) and be 0 where the window spans the "
                                  "grid")


@dataclass
class DataConfig:
    # A dataset folder with index.json (fastmavil-prep / fastmavil-synth), a folder of
    # shard-*.tar, or one .tar file.
    shards: str = ""
    # "reference": a DataLoader whose workers decode with PyAV and soundfile; "dali": NVIDIA
    # DALI decodes (fastmavil.data.dali_loader), on dali_device ("auto": the GPU under CUDA,
    # whose NVDEC takes H.264; "cpu" decodes VP9 and MJPEG), the same samples.
    loader: str = "reference"
    dali_device: str = "auto"
    # reference: DataLoader worker processes (0: in the trainer); dali: its decoding threads
    num_workers: int = 2
    shuffle_buffer: int = 512
    # fbank normalisation (fbank - mean) / (2 * std); AudioSet values (paper Table 4).
    audio_mean: float = -4.268
    audio_std: float = 4.569
    # Table 4 "R": roll the waveform cyclically by a random offset when loading (training only).
    roll: bool = True
    # Video: frames (model.video_frames) evenly over this many seconds.
    video_seconds: float = 4.0
    video_mean: tuple[float, float, float] = (0.45, 0.45, 0.45)   # MAE-ST; ImageNet also fine
    video_std: tuple[float, float, float] = (0.225, 0.225, 0.225)
    seed: int = 0
    # When > 0 and `shards` (a folder named `train`) holds no dataset of this many synthetic
    # clips yet, fastmavil-train first generates them there, from `seed` (fastmavil-synth, for
    # demos; a rerun keeps the shards that already match).
    synth_clips: int = 0
    # When > 0, train on this many random clips per epoch held in memory instead of `shards`
    # (fastmavil.data.random_clips): the trainer's speed without a dataset or a decoder.
    random_clips: int = 0

    def check(self) -> None:
        if self.random_clips < 0:
            raise ConfigError(f"data.random_clips = {self.random_clips} must be >= 0 (0: train "
                              "on data.shards)")
        if self.synth_clips and Path(self.shards).name != "train":
            raise ConfigError(f"data.shards = {self.shards!r} must end in a folder named 'train' "
                              "when data.synth_clips > 0 (fastmavil-synth writes train/ and "
                              "heldout/); to train on an existing dataset, also pass "
                              "--data.synth_clips 0")
        if self.loader not in ("reference", "dali"):
            raise ConfigError(f"data.loader = {self.loader!r}: choose 'reference' or 'dali'")
        if self.dali_device not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"data.dali_device = {self.dali_device!r}: choose 'auto', 'cpu' "
                              "or 'gpu'")
        if self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ConfigError(f"data.num_workers = {self.num_workers} must be >= 0 and "
                              f"data.shuffle_buffer = {self.shuffle_buffer} >= 1")
        for key in ("audio_std", "video_std", "video_seconds"):
            value = getattr(self, key)
            if min(value if isinstance(value, (list, tuple)) else [value]) <= 0:
                raise ConfigError(f"data.{key} = {value} must be > 0")


@dataclass
class MaskConfig:
    # Masking ratio per epoch: `fixed` uses `start` throughout; `linear` goes from `start` at the
    # first epoch to `end` at the last (the paper's curriculum: 0.9 -> 0.8).
    schedule: str = field(default="fixed", metadata=_choices("fixed", "linear"))
    start: float = 0.8
    end: float | None = None  # defaults to `start`

    def __post_init__(self):
        if self.end is None:
            self.end = self.start

    def check(self) -> None:
        for key in ("start", "end"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"mask.{key} = {getattr(self, key)} must lie in (0, 1)")
        if self.schedule == "fixed" and self.end != self.start:
            raise ConfigError(f"mask.end = {self.end} differs from mask.start = {self.start} "
                              "but mask.schedule = 'fixed'; use 'linear'")


@dataclass
class DiffusionConfig:
    # DDPM-style forward process on the masked patches (paper Sec. 3, App. C).
    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # Variance exponent phi: the noise variance of step t is beta_t ** phi (DiffMAE).
    phi: float = 0.8

    def check(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"diffusion.steps = {self.steps} must be >= 1")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError("diffusion.beta_start and diffusion.beta_end must satisfy "
                              f"0 < beta_start <= beta_end < 1, got {self.beta_start}, "
                              f"{self.beta_end}")
        if self.phi <= 0:
            raise ConfigError(f"diffusion.phi = {self.phi} must be > 0")


@dataclass
class LossConfig:
    # Reconstruction targets normalised per patch (MAE's norm_pix_loss).
    norm_pix: bool = True
    # InfoNCE weights and temperature. The paper does not give them; peers use temperatures
    # 0.05-0.1 and small weights (CAV-MAE: 0.01). Our choice: 0.01 each, temperature 0.1.
    inter_weight: float = 0.01
    intra_weight: float = 0.01
    temperature: float = 0.1

    def check(self) -> None:
        for key in ("inter_weight", "intra_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"loss.{key} = {getattr(self, key)} must be >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"loss.temperature = {self.temperature} must be > 0")


@dataclass
class OptimConfig:
    # Table 4, pre-training column. `lr` is the rate itself at the effective batch (2048 in
    # the paper configs), not MAE's base rate scaled by batch / 256.
    lr: float = 4e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: int = 8
    # What the warm-up and cosine run over (the paper says only "cosine decay"): `epochs`, the
    # fractional epoch epoch + i / steps_e as MAE and AudioMAE's lr_sched do; `steps`, the
    # optimizer steps. They differ only where epochs hold different numbers of steps (the
    # adaptive batch: R4's epochs at rho = 0.9 have half the steps of those at 0.8).
    lr_schedule: str = field(default="epochs", metadata=_choices("epochs", "steps"))
    # How lr follows the adaptive batch B_e (see fastmavil.schedule.learning_rate).
    lr_batch_scaling: str = field(default="none", metadata=_choices("none", "linear", "sqrt"))
    # `adamw`: torch.optim.AdamW, fused (on CUDA and CPU); `apex`: apex's FusedAdam, only if
    # importable.
    optimizer: str = field(default="adamw", metadata=_choices("adamw", "apex"))

    def check(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr = {self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr = {self.min_lr} must lie in [0, optim.lr = {self.lr}]")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs = {self.warmup_epochs} must be >= 0")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay = {self.weight_decay} must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas = {list(self.betas)} must each lie in [0, 1)")


@dataclass
class TrainConfig:
    epochs: int = 60
    # Effective batch size; with adaptive_batch it is B0, the batch at the lowest masking ratio.
    batch_size: int = 2048
    # Adaptive batch (paper Sec. 3), B0 at the lowest masking ratio; the batch at epoch e by
    #   tokens  B_e = (1 - min(rho1, rho2)) / (1 - rho_e) * B0: the paper's formula (constant
    #           visible tokens per step)
    #   flops   B_e = F(min(rho1, rho2)) / F(rho_e) * B0, F = the model's forward FLOPs per
    #           sample: the paper's stated aim, "constant compute at each iteration", which the
    #           token rule misses because the decoders' work follows the masked tokens
    adaptive_batch: bool = False
    adaptive_batch_rule: str = field(default="tokens", metadata=_choices("tokens", "flops"))
    # Shapes: B_e rounds to a multiple of batch_multiple (and of the passes per step, below;
    # with passes_per_step = "fit", to whole passes instead); rho_e takes at most max_shapes
    # values.
    batch_multiple: int = 8
    max_shapes: int = 11
    # Samples per forward pass at B0 (0: the whole batch). A step accumulates gradients over
    # batch_size / micro_batch_size passes at B0; with the adaptive batch each pass takes
    # micro_batch_size * B_e / B0 samples, so a pass does as much work at every ratio (the
    # paper: 2048 over 256 GPUs, 8 per GPU at rho = 0.8, 16 at 0.9).
    micro_batch_size: int = 0
    # Passes per step under the adaptive batch with micro-batches:
    #   fixed  batch_size / micro_batch_size in every epoch (the paper's 256 GPUs), so B_e rounds
    #          to a multiple of them: r4.toml's steps then miss their budget by up to 5.1 %
    #   fit    each pass takes micro_batch_size * B_e / B0 samples to the nearest whole sample,
    #          and the step as many passes as bring it nearest B_e, missing by at most half a
    #          pass (r4.toml under the FLOPs rule: 243 to 265 passes of 8 to 12 samples, every
    #          step within 0.2 % of its budget)
    passes_per_step: str = field(default="fixed", metadata=_choices("fixed", "fit"))
    # Memory limit: the most samples one forward pass may take (0: no limit); checked against
    # the whole schedule before training starts.
    max_batch_size: int = 0
    max_steps: int = 0          # stop after this many optimizer steps (0: run every epoch)
    grad_clip: float = 0.0      # max gradient norm (0: off; MAE and AudioMAE do not clip)
    compile: bool = False       # torch.compile each transformer block (models/compile.py)
    # Inductor's mode for them: default, or max-autotune (Triton matmul templates timed against
    # cuBLAS while compiling, with elementwise work such as GELU fused into their epilogues;
    # compiling takes minutes longer)
    compile_mode: str = field(default="default", metadata=_choices("default", "max-autotune"))
    # replay each forward + backward pass as a CUDA graph, one per (rho, samples per pass) (CUDA
    # only; fastmavil/cuda_graph.py): the host no longer sets the step's pace
    cuda_graphs: bool = False
    deterministic: bool = False  # deterministic algorithms (bitwise resume on a CPU); sets
                                 # CUBLAS_WORKSPACE_CONFIG (cuBLAS's) unless already set
    seed: int = 0
    device: str = "auto"        # auto | cpu | cuda | cuda:N
    # auto: bf16 autocast on CUDA, fp32 on a CPU
    precision: str = field(default="auto", metadata=_choices("auto", "bf16", "fp32"))
    # The residual stream (the tokens each transformer block adds into) under bf16 autocast:
    # fp32, as autocast leaves it (MAE, AudioMAE and MAViL trained so), or bf16, as Megatron-LM
    # keeps it by default (its --fp32-residual-connection off): half the bytes in every
    # LayerNorm, residual add and their gradients, with bf16 rounding at each add. bf16 needs
    # bf16 precision.
    residual_precision: str = field(default="fp32", metadata=_choices("fp32", "bf16"))
    log_every: int = 10
    ckpt_every: int = 500       # steps between checkpoints (one is always written at the end)
    # also a checkpoint after the first step that ends this many minutes after the last one (0:
    # steps only): a crash loses at most that long and a step, however long steps take
    ckpt_minutes: float = 30.0
    keep_checkpoints: int = 3
    max_bad_steps: int = 5      # consecutive non-finite steps (loss or gradient) stop the run

    @property
    def pass_size(self) -> int:
        """Samples per forward pass (at B0 with adaptive_batch): micro_batch_size, else the
        whole batch."""
        return self.micro_batch_size or self.batch_size

    def steps_to_run(self, planned: int) -> int:
        """The steps a run of `planned` steps trains: train.max_steps ends it early."""
        return min(planned, self.max_steps) if self.max_steps else planned

    def check(self) -> None:
        for key in ("epochs", "batch_size", "batch_multiple", "max_shapes", "log_every",
                    "ckpt_every", "keep_checkpoints", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} = {getattr(self, key)} must be >= 1")
        for key in ("micro_batch_size", "max_batch_size", "max_steps", "grad_clip",
                    "ckpt_minutes"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} = {getattr(self, key)} must be >= 0")
        micro = self.micro_batch_size
        if micro and self.batch_size % micro:
            raise ConfigError(f"train.micro_batch_size = {micro} must divide train.batch_size = "
                              f"{self.batch_size}")
        if self.adaptive_batch and self.batch_size % self.batch_multiple:
            raise ConfigError(f"train.batch_size = {self.batch_size} must be a multiple of "
                              f"train.batch_multiple = {self.batch_multiple} with the adaptive "
                              "batch (it is the batch at the lowest mask ratio)")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"train.compile_mode = {self.compile_mode!r} needs train.compile "
                              "= true (it is the mode of that compilation)")
        if self.residual_precision == "bf16" and self.precision == "fp32":
            raise ConfigError("train.residual_precision = 'bf16' needs bf16 autocast "
                              "(train.precision = 'bf16', or 'auto' on a CUDA device); "
                              "train.precision is 'fp32'")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device = {self.device!r} is not one of: auto, cpu, cuda, "
                              "cuda:N")


@dataclass
class RunConfig:
    dir: str = "runs"           # runs go to <dir>/<name>/
    name: str = ""              # default: the config file's stem
    tensorboard: bool = True    # TensorBoard events too, when tensorboard is installed

    def check(self) -> None:
        # a folder inside run.dir (nested names, sweep/lr3e-4, are fine): an absolute path or
        # '..' would put the run elsewhere
        parts = Path(self.name.replace("\\", "/")).parts
        if Path(self.name).is_absolute() or ".." in parts or self.name == ".":
            raise ConfigError(f"run.name = {self.name!r} must be a folder inside run.dir, "
                              "without '..' or a leading '/' (set run.dir for the parent "
                              "folder)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check(self) -> "Config":
        check_sections(self)
        if self.mask.schedule == "linear" and self.train.max_shapes < 2:
            raise ConfigError(f"train.max_shapes = {self.train.max_shapes} cannot follow "
                              "mask.schedule = 'linear' (it needs >= 2 ratios)")
        return self


# The settings only the audio-video variants read: the video branch, the fusion encoder and
# the contrastive terms between the modalities.
VIDEO_SETTINGS = ("model.video_decoder_attention", "model.fusion_depth", "model.video_frames",
                  "model.video_size", "model.video_patch", "data.video_seconds",
                  "data.video_mean", "data.video_std", "loss.inter_weight", "loss.intra_weight",
                  "loss.temperature")


def unread_settings(cfg: Config) -> list[str]:
    """`key = value` for each setting moved off its default that `cfg`'s model variant never
    reads: an audio-only variant's video and contrastive settings, a [MASK]-token variant's
    diffusion schedule (a set default is not named: the paper configs write them all)."""
    keys = [] if cfg.model.has_video else list(VIDEO_SETTINGS)
    if not cfg.model.diffusion:
        keys += [f"diffusion.{f.name}" for f in dataclasses.fields(DiffusionConfig)]
    default = Config(model=ModelConfig(size=cfg.model.size))  # the size preset's video shape

    def value(config, key):
        section, name = key.split(".")
        return getattr(getattr(config, section), name)
    return [f"{key} = {to_toml_value(value(cfg, key))}" for key in keys
            if value(cfg, key) != value(default, key)]


def check_sections(cfg, decoders: bool = True) -> None:
    """The checks every config tree shares: finite numbers, seeds, each section's own checks
    (the model's decoders only where they are built), the warm-up against the epochs."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):  # what every section's own checks assume
            value, key = getattr(sub, f.name), f"{section.name}.{f.name}"
            numbers = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise ConfigError(f"{key} = {value} must hold finite numbers only")
            if f.name == "seed" and not 0 <= value < 2 ** 63:
                raise ConfigError(f"{key} = {value} must lie in [0, 2**63)")
        if isinstance(sub, ModelConfig):
            sub.check(decoders)
        elif hasattr(sub, "check"):
            sub.check()
    warmup, epochs = cfg.optim.warmup_epochs, cfg.train.epochs
    if warmup and warmup >= epochs:
        raise ConfigError(f"optim.warmup_epochs = {warmup} must be < train.epochs = {epochs} "
                          "(or 0): the learning rate would never reach optim.lr and decay")


@dataclass
class FinetuneSection:
    """The fine-tuning task (paper Table 4, fine-tuning columns; configs/finetune/)."""
    # The pre-trained model: a checkpoint file, or a run folder (its newest checkpoint); its
    # audio encoder is loaded. Empty: train from random weights (a baseline).
    checkpoint: str = ""
    # Evaluation clips: a dataset folder (default: data.shards, with the filters below)
    eval_shards: str = ""
    # Clips by their json's "split" (fastmavil-prep keeps a CSV's split column); "" keeps all
    train_split: str = ""
    eval_split: str = ""
    # Cross-validation over the clips' json "fold" (ESC-50: 5): fold k evaluates on the clips
    # of fold k and trains on the others, in <run>/fold-k/; the summary gives the mean and std.
    folds: int = 0
    # bce: binary cross-entropy on each class (multi-label, and Table 4's VGGSound); ce: softmax
    # cross-entropy over one label per clip
    loss: str = field(default="bce", metadata=_choices("bce", "ce"))
    # mAP (AudioSet) or top-1 accuracy (the others), on the evaluation clips
    metric: str = field(default="map", metadata=_choices("map", "top1"))
    layer_decay: float = 0.75     # layer-wise lr decay (BEiT): lr * decay ** (layers - layer)
    drop_path: float = 0.1        # stochastic depth at the last encoder block
    # SpecAugment (one time and one frequency mask per clip, widths uniform below these)
    specaug_time: int = 192
    specaug_freq: int = 48
    noise: bool = False           # Table 4's "N": uniform noise on the normalised fbank
    mixup: float = 0.5            # Beta(alpha, alpha) for mixup; 0: off
    cutmix: float = 1.0           # Beta(alpha, alpha) for cutmix; 0: off
    mix_switch_prob: float = 0.5  # with both on: cutmix instead of mixup for this share
    label_smoothing: float = 0.0  # the paper names none
    eval_every: int = 1           # epochs between evaluations (the last epoch always)

    def check(self) -> None:
        if self.folds < 0 or self.folds == 1:
            raise ConfigError(f"finetune.folds = {self.folds} must be 0 (no cross-validation) "
                              "or >= 2")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"finetune.layer_decay = {self.layer_decay} must lie in (0, 1]")
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"finetune.drop_path = {self.drop_path} must lie in [0, 1)")
        for key in ("specaug_time", "specaug_freq", "mixup", "cutmix"):
            if getattr(self, key) < 0:
                raise ConfigError(f"finetune.{key} = {getattr(self, key)} must be >= 0")
        for key in ("mix_switch_prob", "label_smoothing"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"finetune.{key} = {getattr(self, key)} must lie in [0, 1]")
        if self.eval_every < 1:
            raise ConfigError(f"finetune.eval_every = {self.eval_every} must be >= 1")


@dataclass
class FinetuneConfig:
    """fastmavil-finetune's config: the audio encoder fine-tuned as a classifier."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check(self) -> "FinetuneConfig":
        check_sections(self, decoders=False)  # no decoders: their geometry is not checked
        t = self.train
        unused = {"train.adaptive_batch": t.adaptive_batch, "train.cuda_graphs": t.cuda_graphs,
                  "data.random_clips": self.data.random_clips}
        for key, value in unused.items():
            if value:
                raise ConfigError(f"{key} = {to_toml_value(value)} is for pre-training only "
                                  "(fine-tuning has a fixed batch, no CUDA graphs, and reads "
                                  "labelled clips)")
        return self


def _coerce(value, hint, key: str):
    """Checks a TOML value against a field's type hint; ints are accepted for floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # `X | None`: TOML has no None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} = {value!r} must be a list of {len(args)} values")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if not ok:
        expected = "true or false" if hint is bool else f"of type {hint.__name__}"
        shown = to_toml_value(value) if isinstance(value, bool) else repr(value)  # TOML's true
        raise ConfigError(f"{key} = {shown} must be {expected}")
    return value


def _unknown_key(prefix: str, key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    suggestion = f"did you mean {prefix}{close[0]}? " if close else ""
    return ConfigError(f"unknown key {prefix}{key}; {suggestion}allowed: {', '.join(known)}")


# The sections only one command's config has, and that command: a config given to the other
# command is named as such.
COMMAND_SECTIONS = {"finetune": "fastmavil-finetune", "mask": "fastmavil-train",
                    "diffusion": "fastmavil-train", "loss": "fastmavil-train"}


def _misplaced(root: type, key: str, flag: str | None = None) -> ConfigError:
    """The error for an unknown top-level `key` of a `root` config, in a file or in a
    command-line `flag`: a section of the other command's configs, a key that belongs inside a
    section, or a plain unknown key."""
    command = COMMAND_SECTIONS.get(key)
    if command is not None:
        fix = f"run this config with {command}" if flag is None else f"{flag} is {command}'s"
        return ConfigError(f"[{key}] is a section of {command}'s configs, not of this command's: "
                           f"{fix}")
    owners = _sections_with(root, key)
    if owners and flag is None:
        return ConfigError(f"{key} is outside any section; put it under "
                           f"{' or '.join(f'[{name}]' for name in owners)}")
    if owners:
        return ConfigError(f"{key} is outside any section; did you mean "
                           f"{' or '.join(f'--{name}.{flag[2:]}' for name in owners)}?")
    return _unknown_key("", key, typing.get_type_hints(root))


def _sections_with(root: type, key: str) -> list[str]:
    """The sections of a `root` config that have a key named `key`."""
    return [name for name, hint in typing.get_type_hints(root).items()
            if dataclasses.is_dataclass(hint) and key in typing.get_type_hints(hint)]


def _from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = prefix + key
        if key not in known:
            if not prefix:  # the top level: a key above every [section], or another command's
                raise _misplaced(cls, key)
            raise _unknown_key(prefix, key, known)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, name + ".")
            continue
        kwargs[key] = _coerce(value, hint, name)
        choices = known[key].metadata.get("choices")
        if choices and kwargs[key] not in choices:
            raise ConfigError(f"{name} = {value!r} is not one of: {', '.join(choices)}")
    return cls(**kwargs)


def _parse_value(text: str):
    """A CLI override value in TOML syntax (`0.9`, `true`, `[4, 4]`), else a bare string (also
    for what TOML would read as a date, e.g. a run named 2024-01-15)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return text if isinstance(value, (datetime.date, datetime.time)) else value


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the other arguments, {"section.key": "VALUE"}) from a command line holding
    `--section.key VALUE` or `--section.key=VALUE` overrides anywhere among its arguments."""
    rest, overrides, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        if not (arg.startswith("--") and "." in arg.split("=", 1)[0]):
            rest.append(arg)
            i += 1
        elif "=" in arg:
            key, value = arg[2:].split("=", 1)
            overrides[key] = value
            i += 1
        elif i + 1 < len(argv):
            overrides[arg[2:]] = argv[i + 1]
            i += 2
        else:
            raise ConfigError(f"{arg} needs a value")
    return rest, overrides


def _set(data: dict, dotted_key: str, value) -> None:
    """Sets `section.key` in a raw config dict."""
    *path, leaf = dotted_key.split(".")
    node = data
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{part} is not a section")
    node[leaf] = value


def config_from_dict(data: dict, root: type = Config) -> Config:
    return _from_dict(root, data).check()


def to_toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(to_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def to_toml(cfg) -> str:
    """The resolved config as TOML, one table per section (readable by load_config)."""
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        sub = getattr(cfg, section.name)
        lines += [f"{f.name} = {to_toml_value(getattr(sub, f.name))}"
                  for f in dataclasses.fields(sub)]
        lines.append("")
    return "\n".join(lines)


# Fields added since configs were first saved whose default is not what the code did before
# them: a saved config without the field was trained under this value.
BEFORE_FIELD = {"optim.lr_schedule": "steps"}


def config_changes(old_toml: str, new: Config) -> dict[str, tuple]:
    """Dotted key -> (old, new) for every value that differs between a saved config (TOML text,
    as to_toml writes it) and `new`. A key the saved config lacks (a field added since) counts
    only when `new` moves it off its default, or off BEFORE_FIELD's value; a key that no longer
    exists is ignored."""
    def flat(toml_text: str) -> dict:
        return {f"{section}.{key}": value for section, table in tomllib.loads(toml_text).items()
                for key, value in table.items()}
    try:
        old = {**BEFORE_FIELD, **flat(old_toml)}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"the saved config is not valid TOML: {e}") from None
    cur, defaults = flat(to_toml(new)), flat(to_toml(type(new)().check()))
    return {k: (old.get(k), v) for k, v in sorted(cur.items())
            if (old[k] != v if k in old else v != defaults.get(k))}


def load_config(path: str | Path, overrides: dict[str, str] | None = None,
                root: type = Config):
    """Reads a TOML config (a `root`: Config or FinetuneConfig), applies dotted overrides,
    validates; errors name the file."""
    path = Path(path)
    try:  # utf-8-sig: a byte-order mark (some Windows editors write one) is not TOML
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as err:  # a folder, no permission, ...
        raise ConfigError(f"{path}: cannot read the config: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text, as TOML must be (byte {err.start}: "
                          f"{err.object[err.start:err.start + 1]!r})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    overrides = overrides or {}
    for key, text in overrides.items():  # each override's key and type, named as given
        try:
            hint = _field_hint(key, root)
            value = _parse_value(text)
            if hint is str and not isinstance(value, str):  # a name that looks like a number
                value = text
            _set(data, key, _coerce(value, hint, key))
        except ConfigError as err:
            raise ConfigError(f"command line --{key} {text}: {err}") from None
    try:
        return config_from_dict(data, root)
    except ConfigError as err:  # blamed on the overrides the message names, else on the file
        named = [f"--{key} {text}" for key, text in overrides.items()
                 if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", str(err))]
        source = f"command line {', '.join(named)}" if named else str(path)
        raise ConfigError(f"{source}: {err}") from None


def _field_hint(dotted_key: str, root: type = Config):
    """The type of config key `section.key`; unknown keys raise, with the nearest known one."""
    cls, prefix = root, ""
    *sections, leaf = dotted_key.split(".")
    for part in [*sections, leaf]:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            if not hints:
                raise ConfigError(f"{prefix.rstrip('.')} is not a section")
            if not prefix:  # --epochs for --train.epochs, --finetune.x for fastmavil-train
                raise _misplaced(root, part, flag=f"--{dotted_key}")
            raise _unknown_key(prefix, part, hints)
        cls, prefix = hints[part], f"{prefix}{part}."
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"{dotted_key} is a section; override its keys, e.g. "
                          f"--{dotted_key}.{dataclasses.fields(cls)[0].name}")
    return cls
