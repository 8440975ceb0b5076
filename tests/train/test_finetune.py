"""End-to-end fine-tuning on small generated datasets: training and evaluation, resume,
signals, cross-validation folds, split filters and the errors a config can earn."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmavil.config import Config, ConfigError, FinetuneConfig, ModelConfig, load_config, to_toml
from fastmavil.data.loader import LoaderSpec, ShardDataset, collate
from fastmavil.data.shards import ShardWriter, shard_name, write_index
from fastmavil.data.synth import SynthSpec, class_names, make_clip, synthesize
from fastmavil.models import build_model
from fastmavil.train import finetune as ft
from fastmavil.train.checkpoint import list_checkpoints, save_checkpoint
from fastmavil.train.resume import FORMAT
from fastmavil.train.runtime import TrainingError

ROOT = Path(__file__).resolve().parents[2]
SYNTH = SynthSpec(seconds=1.0, size=48, fps=8.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, clips=32, heldout=0.25, clips_per_shard=8, workers=1, spec=SYNTH)
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pre")
    cfg = Config()
    cfg.model = ModelConfig(size="tiny")
    torch.manual_seed(0)
    save_checkpoint(folder, 5, {"model": build_model(cfg.check()).state_dict(),
                                "config": to_toml(cfg), "step": 5, "format": FORMAT}, keep=1)
    return folder


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    """12 clips in 3 folds (fold k: clips with index % 3 == k - 1) and two splits."""
    folder = tmp_path_factory.mktemp("folds")
    path = folder / shard_name(0)
    with ShardWriter(path) as writer:
        for i in range(12):
            key, members = make_clip(i, SYNTH, "train")
            members["json"] = {**members["json"], "fold": i % 3 + 1,
                               "split": "test" if i < 4 else "train"}
            writer.add(key, members)
    write_index(folder, [{"name": path.name, "clips": 12, "bytes": path.stat().st_size}],
                class_names(SYNTH.classes))
    return folder


def config(data, pretrained, run_dir, **extra):
    return load_config(ROOT / "configs" / "finetune" / "demo.toml",
                       overrides(data, pretrained, run_dir, **extra), FinetuneConfig)


def overrides(data, pretrained, run_dir, **extra):
    base = {"data.shards": str(data / "train"), "data.synth_clips": "0",
            "data.num_workers": "0", "data.shuffle_buffer": "8",
            "finetune.eval_shards": str(data / "heldout"),
            "finetune.checkpoint": str(pretrained), "model.audio_frames": "96",
            "finetune.specaug_time": "16", "finetune.specaug_freq": "16",
            "finetune.eval_every": "1",
            "train.epochs": "3", "train.batch_size": "4", "train.log_every": "2",
            "train.ckpt_every": "4", "train.deterministic": "true", "optim.warmup_epochs": "1",
            "run.dir": str(run_dir), "run.name": "t"}
    return {**base, **{k.replace("__", "."): str(v) for k, v in extra.items()}}


def records(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_finetuning_trains_evaluates_and_checkpoints(data, pretrained, tmp_path):
    cfg = config(data, pretrained, tmp_path, finetune__mixup=0.5, finetune__cutmix=1.0,
                 finetune__loss="bce", finetune__metric="map")
    summary = ft.finetune(cfg, [])
    (run,) = summary["runs"]
    assert run["step"] == run["total_steps"] == 3 * (24 // 4)
    assert [r["epoch"] for r in run["evals"]] == [0, 1, 2]
    last = run["evals"][-1]
    assert last["eval_clips"] == 8 and 0 < last["eval_map"] <= 1 and last["eval_classes"] >= 1
    logged = records(tmp_path / "t")
    train = [r for r in logged if "loss" in r]
    assert len(train) >= 3 and all(r["loss"] == r["loss"] for r in train)  # finite
    assert [r for r in logged if "eval_map" in r] == run["evals"]
    saved = json.loads((tmp_path / "t" / "results.json").read_text())
    assert saved["evals"] == run["evals"] and saved["pretrained"].endswith("step-00000005.pt")
    state = torch.load(list_checkpoints(tmp_path / "t")[-1], weights_only=False)
    assert state["step"] == 18 and state["evals"] == run["evals"]
    pre = torch.load(list_checkpoints(pretrained)[-1], weights_only=False)["model"]
    moved = state["model"]["encoder.blocks.1.mlp.0.weight"] - \
        pre["audio_encoder.blocks.1.mlp.0.weight"]
    assert float(moved.abs().max()) > 0  # the pre-trained encoder was fine-tuned


@pytest.mark.parametrize("workers, extra, stop", [
    (0, {}, 8),  # mid-epoch 1 of 6-step epochs
    (2, {}, 8),
    # passes of 3: each worker drops a partial one, so each epoch's 4th step is cut short
    # after a pass; stopped there, at the end of epoch 0, a resume must not miss that pass's
    # gradient, which the next step must not carry either
    (2, {"train__micro_batch_size": 3, "train__batch_size": 6}, 4)])
def test_a_resume_mid_epoch_reproduces_an_uninterrupted_run(data, pretrained, tmp_path, workers,
                                                           extra, stop):
    whole = ft.finetune(config(data, pretrained, tmp_path / "a", data__num_workers=workers,
                               **extra), [])
    # stopped, with an extra evaluation there, then resumed
    cut = ft.finetune(config(data, pretrained, tmp_path / "b", data__num_workers=workers,
                             train__max_steps=stop, **extra), [])
    assert cut["runs"][0]["step"] == stop and cut["runs"][0]["evals"][-1]["step"] == stop
    resumed = ft.finetune(config(data, pretrained, tmp_path / "b", data__num_workers=workers,
                                 **extra), [])
    a = torch.load(list_checkpoints(tmp_path / "a" / "t")[-1], weights_only=False)
    b = torch.load(list_checkpoints(tmp_path / "b" / "t")[-1], weights_only=False)
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    regular = {r["step"] for r in whole["runs"][0]["evals"]}  # the stop's own one left out
    final = [r for r in resumed["runs"][0]["evals"] if r["step"] in regular]
    assert final == whole["runs"][0]["evals"]
    # the log holds each step once, the resumed run's records replacing none
    steps = [r["step"] for r in records(tmp_path / "b" / "t") if "loss" in r]
    assert steps == sorted(set(steps))


def test_a_signal_checkpoints_and_the_rerun_goes_on(data, pretrained, tmp_path, monkeypatch):
    step = ft._Run.train_step
    calls = []

    def interrupted(self, batches):
        calls.append(1)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGINT)
        return step(self, batches)
    monkeypatch.setattr(ft._Run, "train_step", interrupted)
    summary = ft.finetune(config(data, pretrained, tmp_path), [])
    assert summary["interrupted"] == "SIGINT" and summary["runs"][0]["step"] == 5
    assert list_checkpoints(tmp_path / "t")[-1].name == "step-00000005.pt"
    monkeypatch.setattr(ft._Run, "train_step", step)
    again = ft.finetune(config(data, pretrained, tmp_path), [])
    assert again["runs"][0]["step"] == 18 and again["interrupted"] is None
    assert [r["epoch"] for r in again["runs"][0]["evals"]] == [0, 1, 2]


def test_cross_validation_trains_one_run_per_fold_and_reports_the_mean(folds, pretrained,
                                                                        tmp_path):
    cfg = config(folds, pretrained, tmp_path, data__shards=folds, finetune__eval_shards="",
                 finetune__folds=3, train__epochs=2)
    summary = ft.finetune(cfg, [])
    assert [Path(r["run_dir"]).name for r in summary["runs"]] == ["fold-1", "fold-2", "fold-3"]
    for run in summary["runs"]:
        assert run["total_steps"] == 2 * (8 // 4)  # trained on the other two folds' 8 clips
        assert run["evals"][-1]["eval_clips"] == 4  # evaluated on its own
    finals = [r["evals"][-1]["eval_top1"] for r in summary["runs"]]
    cv = json.loads((tmp_path / "t" / "cv.json").read_text())
    assert cv["folds"] == finals and cv["mean"] == pytest.approx(sum(finals) / 3)


def test_the_clip_filters_read_only_their_clips_across_workers(folds):
    spec = LoaderSpec(audio_frames=96, audio_only=True, train=False, shuffle_buffer=1)
    cases = [(ft.ClipFilter("test"), {f"synth{i:06d}" for i in range(4)}),
             (ft.ClipFilter(fold=2), {f"synth{i:06d}" for i in (1, 4, 7, 10)}),
             (ft.ClipFilter("train", fold=2, in_fold=False),
              {f"synth{i:06d}" for i in range(4, 12) if i % 3 != 1}),
             (ft.ClipFilter(not_split="test"), {f"synth{i:06d}" for i in range(4, 12)})]
    for keep, expected in cases:
        dataset = ShardDataset(folds, spec, keep=keep)
        assert dataset.num_clips() == len(expected)
        # spawned workers receive the dataset, its filter included, pickled
        loader = torch.utils.data.DataLoader(dataset, 2, num_workers=2, collate_fn=collate,
                                             multiprocessing_context="spawn")
        keys = [k for batch in loader for k in batch["keys"]]
        assert sorted(keys) == sorted(expected)


def test_evaluation_clips_drawn_by_split_are_kept_out_of_training(folds, pretrained,
                                                                  tmp_path):
    cfg = config(folds, pretrained, tmp_path, data__shards=folds, finetune__eval_shards="",
                 finetune__eval_split="test", train__epochs=2)
    (run,) = ft.finetune(cfg, [])["runs"]
    assert run["total_steps"] == 2 * (8 // 4)  # the 8 "train" clips, not all 12
    assert run["evals"][-1]["eval_clips"] == 4


def test_clear_errors_before_training(data, pretrained, folds, tmp_path, capsys):
    cases = [
        (dict(finetune__eval_shards=""), "finetune.eval_shards is empty"),
        (dict(finetune__eval_shards=str(data / "train")), "nothing to tell the evaluation"),
        (dict(finetune__eval_shards="", finetune__eval_split="a", finetune__train_split="a"),
         "would be trained on"),
        (dict(finetune__mixup=0.5, train__micro_batch_size=3, train__batch_size=6),
         "must be even"),
        (dict(train__passes_per_step="fit"), "fixed batch"),
        (dict(train__residual_precision="bf16", train__precision="bf16",
              train__max_batch_size=2), "exceeds train.max_batch_size = 2"),
        (dict(train__residual_precision="bf16", train__device="cpu"),
         r"needs bf16 autocast; this run trains in fp32 \(train.precision = 'auto' on cpu\)"),
        (dict(data__loader="dali"), "reference loader"),
        (dict(finetune__eval_shards=str(tmp_path / "nowhere")), "does not exist"),
        (dict(train__batch_size=64), "at least train.batch_size = 64"),
        (dict(model__encoder_dim=96, model__encoder_heads=3), "model.encoder_dim: 64 there"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            ft.finetune(config(data, pretrained, tmp_path, **extra), [])
        assert not (tmp_path / "t").exists()  # a run that failed at its start leaves no folder
    with pytest.raises(ConfigError, match="does not exist: name a fastmavil-train run folder"):
        ft.finetune(config(data, pretrained, tmp_path,
                           finetune__checkpoint=tmp_path / "none"), [])
    # 3 shards of 8 clips over 2 workers: shares of 16 and 8, each smaller than a batch of 20
    with pytest.raises(TrainingError, match="data.num_workers = 2 split the epoch into "):
        ft.finetune(config(data, pretrained, tmp_path, train__batch_size=20,
                           data__num_workers=2), [])
    with pytest.raises(ConfigError, match="1: 4 clips, 2: 4 clips, 3: 4 clips"):
        ft.finetune(config(folds, pretrained, tmp_path, data__shards=folds,
                           finetune__eval_shards="", finetune__folds=5), [])
    old = tmp_path / "old"
    state = torch.load(list_checkpoints(pretrained)[-1], weights_only=False)
    save_checkpoint(old, 5, {**state, "format": 1}, keep=1)
    with pytest.raises(ConfigError, match="has checkpoint format 1"):
        ft.finetune(config(data, pretrained, tmp_path, finetune__checkpoint=old), [])
    # labels that differ from the training set's
    other = tmp_path / "other"
    other.mkdir()
    path = other / shard_name(0)
    with ShardWriter(path) as writer:
        writer.add(*make_clip(0, SYNTH, "train"))
    write_index(other, [{"name": path.name, "clips": 1, "bytes": path.stat().st_size}],
                ["a", "b"])
    with pytest.raises(ConfigError, match="names other labels"):
        ft.finetune(config(data, pretrained, tmp_path, finetune__eval_shards=other), [])
    for key, value, message in (("train.adaptive_batch", "true", "fixed batch"),
                                ("finetune.folds", "1", "finetune.folds = 1"),
                                ("finetune.layer_decay", "0", "finetune.layer_decay")):
        with pytest.raises(ConfigError, match=message):
            load_config(ROOT / "configs" / "finetune" / "demo.toml", {key: value},
                        FinetuneConfig)
    assert ft.main([str(ROOT / "configs/finetune/demo.toml"), "--finetune.lr", "1"]) == 2
    assert "unknown key finetune.lr" in capsys.readouterr().err
    assert ft.main([str(ROOT / "configs/finetune/demo.toml"), "--finetune.chekpoint", "x"]) == 2
    assert "did you mean finetune.checkpoint" in capsys.readouterr().err


def test_the_paper_configs_hold_table_4(tmp_path):
    expected = {  # lr, warm-up, epochs, batch, SpecAugment, mixup, cutmix, loss, frames,
        # mean and std, noise ("N")
        "as20k": (2.5e-4, 4, 60, 64, (192, 48), 0.5, 1.0, "bce", 1024, -4.268, 4.569, False),
        "vggsound": (2e-4, 1, 60, 256, (192, 48), 0.5, 1.0, "bce", 1024, -5.189, 3.260, True),
        "esc50": (2.5e-4, 4, 100, 64, (96, 24), 0.0, 0.0, "ce", 512, -6.627, 5.359, False),
        "spcv2": (1e-3, 4, 60, 256, (48, 48), 0.0, 0.0, "ce", 128, -6.702, 5.448, False),
    }
    for name, values in expected.items():
        cfg = load_config(ROOT / "configs" / "finetune" / f"{name}.toml", None, FinetuneConfig)
        f, o, t = cfg.finetune, cfg.optim, cfg.train
        assert (o.lr, o.warmup_epochs, t.epochs, t.batch_size, (f.specaug_time, f.specaug_freq),
                f.mixup, f.cutmix, f.loss, cfg.model.audio_frames, cfg.data.audio_mean,
                cfg.data.audio_std, f.noise) == values
        assert (o.weight_decay, o.min_lr, o.betas, f.layer_decay, f.drop_path, cfg.data.roll) == \
            (1e-4, 1e-6, (0.9, 0.95), 0.75, 0.1, True)  # "R": the waveform rolled
    assert load_config(ROOT / "configs/finetune/esc50.toml", None,
                       FinetuneConfig).finetune.folds == 5


def test_two_processes_fine_tune_score_every_clip_once_and_resume_exactly(data, pretrained,
                                                                          tmp_path):
    """torchrun, 2 CPU processes over gloo: one pass of 2 clips each per step of 4."""
    def torchrun(run_dir, **extra):
        args = overrides(data, pretrained, run_dir, train__micro_batch_size=2, **extra)
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", "-m", "fastmavil.train.finetune",
             str(ROOT / "configs" / "finetune" / "demo.toml"),
             *[f"--{k}={v}" for k, v in args.items()]],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((run_dir / "t" / "results.json").read_text())["evals"]

    whole = torchrun(tmp_path / "a")
    assert [r["epoch"] for r in whole] == [0, 1, 2]
    assert all(r["eval_clips"] == 8 for r in whole)  # each process scored its half
    torchrun(tmp_path / "b", train__max_steps=8)  # stopped mid-epoch 1, then resumed
    resumed = torchrun(tmp_path / "b")
    assert [r for r in resumed if r["step"] in {w["step"] for w in whole}] == whole
    a = torch.load(list_checkpoints(tmp_path / "a" / "t")[-1], weights_only=False)
    b = torch.load(list_checkpoints(tmp_path / "b" / "t")[-1], weights_only=False)
    assert len(a["ranks"]) == 2
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name


def test_the_summary_prints_the_metric_as_the_eval_lines_do():
    from rich.console import Console
    evals = [{"epoch": 4, "eval_top1": 0.25}, {"epoch": 9, "eval_top1": 0.1833}]
    summary = {"metric": "top1", "folds": 0, "seconds": 1.0, "interrupted": None,
               "runs": [{"run_dir": "runs/x", "step": 300, "total_steps": 450, "start_step": 0,
                         "trained_steps": 280, "evals": evals, "pretrained": None,
                         "checkpoint": "c.pt"}]}
    console = Console(record=True, width=250, file=open(os.devnull, "w"))
    ft._print_summary(console, summary, [])
    text = console.export_text()
    # not at its end: "latest", not "final"; percentages as the eval lines print top-1
    assert ("step 300 / 450: latest top-1 18.33% (epoch 9), best 25.00% (epoch 4) (280 "
            "trained, 20 passed over where an epoch's data ended early this run)") in text


def test_a_resume_in_another_number_of_processes_reseeds_every_devices_stream(monkeypatch):
    """Stochastic depth draws from the default stream of the training device: on CUDA that is
    not torch.default_generator (the CPU's), so the reseed must reach every device's."""
    import types
    from fastmavil.train.distributed import World
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    run = types.SimpleNamespace(
        model=model, optimizer=optimizer, world=World(), seed=7, last_ckpt="c.pt",
        generator=torch.Generator(), host_generator=torch.Generator())
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 3,
             "evals": [], "ranks": [{}, {}]}  # written by 2 processes
    seeds = []
    monkeypatch.setattr(torch, "manual_seed", lambda seed: seeds.append(seed))
    ft._Run._restore(run, state)
    assert len(seeds) == 1 and run.generator.initial_seed() == seeds[0]


def test_a_checkpoints_save_is_not_counted_as_step_time(data, pretrained, tmp_path,
                                                        monkeypatch):
    """Step 4's checkpoint (train.ckpt_every = 4) is saved mid-epoch: the record of steps 5-6
    times those steps alone, without the save."""
    import time
    import fastmavil.train.checkpoint as checkpoint
    save = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda *args: time.sleep(3) or save(*args))
    ft.finetune(config(data, pretrained, tmp_path, train__max_steps=6), [])
    steps = {r["step"]: r for r in records(tmp_path / "t") if "step_ms" in r}
    assert sorted(steps) == [2, 4, 6] and steps[6]["step_ms"] < 1000, steps[6]
