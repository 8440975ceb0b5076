from pathlib import Path

import pytest

from fastmavil.config import (SIZES, Config, ConfigError, FinetuneConfig, OptimConfig,
                              TrainConfig, config_changes, load_config, to_toml,
                              unread_settings)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


PAPER_CONFIGS = sorted(p for p in CONFIGS.glob("*.toml") if p.stem != "demo")


def test_demo_is_a_tiny_r4():
    cfg = load_config(CONFIGS / "demo.toml")
    assert cfg.model.size == "tiny" and cfg.model.video_decoder_attention == "cross"
    assert (cfg.mask.schedule, cfg.mask.start, cfg.mask.end) == ("linear", 0.9, 0.8)
    assert cfg.train.adaptive_batch and cfg.data.synth_clips > 0


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_at_paper_size(path):
    cfg = load_config(path)
    m = cfg.model
    assert (m.encoder_dim, m.encoder_depth, m.encoder_heads) == (768, 12, 12)
    assert (m.decoder_dim, m.decoder_depth, m.decoder_heads) == (512, 8, 16)
    assert m.audio_grid == (64, 8) and m.video_grid == (8, 14, 14)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) == (4e-4, 1e-6, 1e-5)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.warmup_epochs == 8
    assert (cfg.train.epochs, cfg.train.batch_size) == (60, 2048)
    assert (cfg.diffusion.steps, cfg.diffusion.phi) == (1000, 0.8)


def test_paper_rows():
    rows = {name: load_config(CONFIGS / f"{name}.toml") for name in ("r1", "r2", "r3", "r4")}
    assert rows["r1"].model.video_decoder_attention == "self"
    assert all(rows[r].model.video_decoder_attention == "cross" for r in ("r2", "r3", "r4"))
    assert (rows["r2"].mask.schedule, rows["r2"].mask.start) == ("fixed", 0.8)
    assert (rows["r3"].mask.start, rows["r3"].mask.end) == (0.9, 0.8)
    assert not rows["r3"].train.adaptive_batch and rows["r4"].train.adaptive_batch
    assert load_config(CONFIGS / "mavil.toml").model.variant == "mavil"


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "[model]\nvarient = 'mavil'\n")
    with pytest.raises(ConfigError, match=r"c\.toml: unknown key model\.varient; did you mean "
                                          r"model\.variant\? allowed: variant"):
        load_config(path)
    with pytest.raises(ConfigError, match="c.toml: optim.warmup_epochs = 8 must be < "
                                          "train.epochs = 2"):  # the file's keys alone
        load_config(write(tmp_path, "[optim]\nwarmup_epochs = 8\n[train]\nepochs = 2\n"),
                    {"run.name": "x"})
    with pytest.raises(ConfigError, match="unknown key modle"):
        load_config(write(tmp_path, "[modle]\nsize = 'tiny'\n"))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_configs_set_nothing_their_variant_never_reads(path):
    assert unread_settings(load_config(path)) == []


def test_settings_a_variant_never_reads_are_named():
    overrides = {"model.size": "small", "model.video_frames": "4", "loss.inter_weight": "0.05",
                 "data.video_mean": "[0.5, 0.5, 0.5]", "diffusion.phi": "0.5",
                 "loss.norm_pix": "false", "optim.lr": "1e-4"}  # the last two: read by all
    named = ["model.video_frames = 4", "data.video_mean = [0.5, 0.5, 0.5]",
             "loss.inter_weight = 0.05", "diffusion.phi = 0.5"]
    assert unread_settings(load_config(CONFIGS / "audiomae.toml", overrides)) == named
    assert unread_settings(load_config(CONFIGS / "audiomae_diff.toml", overrides)) == named[:3]
    assert unread_settings(load_config(CONFIGS / "mavil.toml", overrides)) == named[3:]
    assert unread_settings(load_config(CONFIGS / "r4.toml", overrides)) == []
    # the size preset's own video shape is its default, not a setting
    assert unread_settings(load_config(CONFIGS / "audiomae.toml", {"model.size": "tiny"})) == []


def test_bad_choice_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match="model.variant = 'mae' is not one of: mavil, diffmavil"):
        load_config(write(tmp_path, "[model]\nvariant = 'mae'\n"))


@pytest.mark.parametrize("text, message", [
    ("[train]\nepochs = 'ten'\n", "train.epochs = 'ten' must be of type int"),
    ("[train]\nepochs = true\n", "train.epochs = true must be of type int"),
    ("[model]\naudio_patch = [16]\n", "model.audio_patch = \\[16\\] must be a list of 2 values"),
    ("[mask]\nstart = 1.2\n", "mask.start = 1.2 must lie in \\(0, 1\\)"),
    ("[mask]\nstart = 0.9\nend = 0.8\n", "use 'linear'"),
    ("[model]\nsize = 'tiny'\nencoder_heads = 3\n", "model.encoder_dim = 64 must be divisible"),
    ("[model]\nsize = 'tiny'\nmel_bins = 100\n", "model.mel_bins = 100 must be a positive multiple"),
    ("[model]\nsize = 'tiny'\naudio_decoder_window = [3, 4]\n", "must tile the audio token grid"),
    ("[diffusion]\nbeta_start = 0.5\nbeta_end = 0.1\n", "beta_start <= beta_end"),
    ("[loss]\ntemperature = 0\n", "loss.temperature = 0.0 must be > 0"),
    ("model = 3\n", "model must be a table"),
    ("[model]\nencoder_heads = 0\n", "model.encoder_heads = 0 must be >= 1"),
    ("[model]\naudio_patch = [0, 16]\n", "model.audio_patch = \\[0, 16\\] must hold sizes >= 1"),
    ("[model]\nvideo_patch = [2, 0, 16]\n", "model.video_patch = .* must hold sizes >= 1"),
    ("[model]\nmlp_ratio = 0\n", "model.mlp_ratio = 0.0 must be > 0"),
    ("[model]\nfusion_depth = -1\n", "model.fusion_depth = -1 must be >= 0"),
    ("[optim]\nbetas = [1.5, 0.95]\n", "optim.betas = \\[1.5, 0.95\\] must each lie in"),
    ("[optim]\nweight_decay = -1\n", "optim.weight_decay = -1.0 must be >= 0"),
    ("[train]\ndevice = 'cudaa'\n", "train.device = 'cudaa' is not one of"),
    ("[train]\ndevice = 'cuda:x'\n", "train.device = 'cuda:x' is not one of"),
    ("[train]\ncompile_mode = 'max-autotune'\n", "train.compile_mode = 'max-autotune' needs "
     "train.compile = true"),
    ("[train]\ncompile = true\ncompile_mode = 'fast'\n", "train.compile_mode = 'fast' is not one of"),
    ("[train]\nprecision = 'fp32'\nresidual_precision = 'bf16'\n",
     "train.residual_precision = 'bf16' needs bf16 autocast .*; train.precision is 'fp32'"),
    ("[data]\nvideo_std = [0.2, 0.0, 0.2]\n", "data.video_std = \\(0.2, 0.0, 0.2\\) must be > 0"),
    ("[data]\naudio_std = 0\n", "data.audio_std = 0.0 must be > 0"),
    # passed the checks before, failed or misbehaved later: seeds out of NumPy's or torch's
    # range, and non-finite numbers (lr = inf ran until max_bad_steps; grad_clip = nan clipped
    # nothing)
    ("[run]\nname = '../escape'\n", "run.name = '../escape' must be a folder inside run.dir"),
    ("[run]\nname = 'a/../../b'\n", "run.name = 'a/../../b' must be a folder inside"),
    ("[run]\nname = '/abs'\n", "run.name = '/abs' must be a folder inside run.dir"),
    ("[data]\nseed = -1\n", "data.seed = -1 must lie in \\[0, 2\\*\\*63\\)"),
    ("[train]\nseed = 9223372036854775808\n", "train.seed = 9223372036854775808 must lie in"),
    ("[optim]\nlr = inf\n", "optim.lr = inf must hold finite numbers only"),
    ("[train]\ngrad_clip = nan\n", "train.grad_clip = nan must hold finite numbers only"),
    ("[data]\nvideo_mean = [0.4, nan, 0.4]\n", "data.video_mean = .* must hold finite numbers"),
])
def test_bad_values(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_misplaced_keys_and_other_commands_configs(tmp_path):
    with pytest.raises(ConfigError, match=r"c.toml: epochs is outside any section; put it "
                                          r"under \[train\]$"):
        load_config(write(tmp_path, "epochs = 3\n[model]\nsize = 'tiny'\n"))
    with pytest.raises(ConfigError, match=r"command line --epochs 3: epochs is outside any "
                                          r"section; did you mean --train.epochs\?"):
        load_config(write(tmp_path, "[model]\nsize = 'tiny'\n"), {"epochs": "3"})
    with pytest.raises(ConfigError, match=r"\[finetune\] is a section of fastmavil-finetune's "
                                          r"configs.*run this config with fastmavil-finetune"):
        load_config(write(tmp_path, "[finetune]\ncheckpoint = 'x.pt'\n"))
    with pytest.raises(ConfigError, match=r"\[mask\] is a section of fastmavil-train's"):
        load_config(write(tmp_path, "[mask]\nstart = 0.8\n"), root=FinetuneConfig)
    with pytest.raises(ConfigError, match=r"--finetune.checkpoint x: \[finetune\] is a section "
                                          r".*: --finetune.checkpoint is fastmavil-finetune's"):
        load_config(write(tmp_path, "[model]\nsize = 'tiny'\n"), {"finetune.checkpoint": "x"})
    # a nested run name stays inside run.dir
    assert load_config(write(tmp_path, "[run]\nname = 'sweep/lr3e-4'\n")).run.name == \
        "sweep/lr3e-4"
    with pytest.raises(ConfigError, match="unknown key nonsense; allowed: model, data"):
        load_config(write(tmp_path, "nonsense = 1\n"))


def test_byte_order_mark_and_non_utf8(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[model]\nsize = 'tiny'\n")  # what some editors write
    assert load_config(path).model.size == "tiny"
    path.write_bytes(b"\xff\xfe[\x00m\x00")  # UTF-16
    with pytest.raises(ConfigError, match=r"bom.toml: not UTF-8 text, as TOML must be \(byte 0"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[model\n"))
    with pytest.raises(ConfigError, match="cannot read the config: Is a directory"):
        load_config(tmp_path)


def test_size_preset_and_explicit_keys(tmp_path):
    cfg = load_config(write(tmp_path, "[model]\nsize = 'small'\ndecoder_depth = 3\n"))
    assert cfg.model.encoder_dim == SIZES["small"]["encoder_dim"]
    assert cfg.model.decoder_depth == 3
    assert cfg.mask.end == cfg.mask.start == 0.8  # end defaults to start


def test_dotted_overrides(tmp_path):
    path = write(tmp_path, "[model]\nvariant = 'mavil'\n")
    cfg = load_config(path, {"model.size": "tiny", "mask.schedule": "linear", "mask.start": "0.9",
                             "mask.end": "0.8",
                             "model.audio_decoder_window": "[2, 2]",
                             "model.audio_decoder_shift": "[1, 0]", "loss.norm_pix": "false"})
    assert cfg.model.size == "tiny" and cfg.model.encoder_dim == 64
    assert (cfg.mask.schedule, cfg.mask.start, cfg.mask.end) == ("linear", 0.9, 0.8)
    assert cfg.model.audio_decoder_window == (2, 2) and cfg.loss.norm_pix is False
    with pytest.raises(ConfigError, match="^command line --train.epochs x: train.epochs = 'x' "
                                          "must be of type int"):
        load_config(path, {"train.epochs": "x"})
    # an override's error names the command line, not the file, and the nearest key
    with pytest.raises(ConfigError, match=r"^command line --train.epohcs 3: unknown key "
                                          r"train.epohcs; did you mean train.epochs\?"):
        load_config(path, {"train.epohcs": "3"})
    with pytest.raises(ConfigError, match="^command line --train.deterministic yes: "
                                          "train.deterministic = 'yes' must be true or false"):
        load_config(path, {"train.deterministic": "yes"})
    with pytest.raises(ConfigError, match="^command line --mask.start 1.2: mask.start = 1.2 must "
                                          "lie"):
        load_config(path, {"mask.start": "1.2"})
    # a check of two keys names the override among them, even when it is the second
    with pytest.raises(ConfigError, match="^command line --model.encoder_heads 5: "
                                          "model.encoder_dim = 768 must be divisible"):
        load_config(path, {"model.encoder_heads": "5"})
    # a name that TOML reads as a number stays a name
    assert load_config(path, {"run.name": "123", "data.shards": '"d"'}).run.name == "123"
    assert load_config(path, {"data.shards": '"d"'}).data.shards == "d"
    with pytest.raises(ConfigError, match="^command line --model 3: model is a section"):
        load_config(path, {"model": "3"})
    # a check of a file's key against an override's names the override
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ConfigError, match="^command line --train.epochs 2: "
                                          "optim.warmup_epochs = 8 must be < train.epochs = 2"):
        load_config(write(other, "[optim]\nwarmup_epochs = 8\n"), {"train.epochs": "2"})
    # text TOML would read as a date stays text
    assert load_config(path, {"run.name": "2024-01-15"}).run.name == "2024-01-15"


def test_config_changes_between_a_saved_config_and_the_current_one():
    cfg = Config().check()
    # an older file: a field since removed (grad_accum), one since added (micro_batch_size)
    saved = to_toml(cfg).replace("micro_batch_size = 0\n", "grad_accum = 1\n")
    assert config_changes(saved, cfg) == {}
    lr = cfg.optim.lr
    cfg.optim.lr, cfg.train.micro_batch_size, cfg.model.size = lr / 2, 8, "tiny"
    assert config_changes(saved, cfg) == {"model.size": ("base", "tiny"),
                                          "optim.lr": (lr, lr / 2),
                                          "train.micro_batch_size": (None, 8)}
    with pytest.raises(ConfigError, match="saved config is not valid TOML"):
        config_changes("[train\n", cfg)
    # a field added with a default unlike the code before it: a file without it trained so
    older = to_toml(Config().check()).replace('lr_schedule = "epochs"\n', "")
    assert config_changes(older, Config().check()) == {"optim.lr_schedule": ("steps", "epochs")}
    steps = Config().check()
    steps.optim.lr_schedule = "steps"
    assert config_changes(older, steps) == {}


def test_warmup_must_end_before_training_does():
    with pytest.raises(ConfigError, match=r"optim.warmup_epochs = 8 must be < train.epochs = 5"):
        Config(train=TrainConfig(epochs=5)).check()
    Config(train=TrainConfig(epochs=5), optim=OptimConfig(warmup_epochs=0)).check()
