"""End-to-end pre-training on a small generated dataset: demo, resume, signals, faults."""
import dataclasses
import itertools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmavil.config import ConfigError, load_config
from fastmavil.data.dali_loader import dali_available
from fastmavil.data.shards import count_clips
from fastmavil.data.synth import SynthSpec, synthesize
from fastmavil.train import pretrain
from fastmavil.train.checkpoint import checkpoint_name, list_checkpoints, load_latest
from fastmavil.train.runtime import TrainingError

ROOT = Path(__file__).resolve().parents[2]


def overrides(shards, run_dir, **extra):
    base = {"data.shards": str(shards), "data.synth_clips": "0", "data.num_workers": "0",
            "data.shuffle_buffer": "8", "train.epochs": "3", "train.batch_size": "4",
            "train.batch_multiple": "2", "train.log_every": "1", "train.ckpt_every": "3",
            "train.deterministic": "true", "run.dir": str(run_dir), "run.name": "t"}
    return {**base, **{k.replace("__", "."): str(v) for k, v in extra.items()}}


def run(shards, run_dir, **extra):
    cfg = load_config(ROOT / "configs" / "demo.toml", overrides(shards, run_dir, **extra))
    return pretrain.train(cfg, ["configs/demo.toml"])


def records(run_dir):
    lines = (Path(run_dir) / "t" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(run_dir):
    lines = (Path(run_dir) / "t" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_run_logs_falls_and_checkpoints(shards, tmp_path, caplog):
    summary = run(shards, tmp_path)
    plan_steps = summary["total_steps"]
    assert summary["step"] == plan_steps > 10
    records = [json.loads(l) for l in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "epoch", "mask_ratio", "batch_size", "visible_tokens", "loss", "mse_audio",
                "mse_video", "inter", "intra", "grad_norm", "lr", "step_ms", "samples_per_s",
                "tokens_per_s", "tflops", "mfu", "data_wait", "peak_memory_gb", "gpu_util"):
        assert key in records[-1], key
    assert records[0]["mask_ratio"] == 0.9 and records[-1]["mask_ratio"] == 0.8
    assert records[0]["batch_size"] == 8 and records[-1]["batch_size"] == 4  # adaptive batch
    assert records[-1]["mse_video"] < records[0]["mse_video"]
    assert (tmp_path / "t" / "config.toml").read_text().startswith("[model]")
    ckpts = list_checkpoints(tmp_path / "t")
    assert len(ckpts) <= 3 and ckpts[-1].name == f"step-{plan_steps:08d}.pt"
    # the same command again: nothing left to train, and it says so
    with caplog.at_level("INFO", logger="fastmavil.train"):
        assert run(shards, tmp_path)["samples"] == 0
    assert f"has trained {plan_steps} steps, of {plan_steps} to train: nothing to do" in caplog.text
    # each start is recorded, with what it ran on
    starts = [json.loads(l) for l in (tmp_path / "t" / "launches.jsonl").open()]
    assert [s["step"] for s in starts] == [0, plan_steps]
    assert starts[0]["processes"] == 1 and "cores" in starts[0]["device"]
    assert starts[0]["versions"]["torch"] == torch.__version__
    assert starts[0]["command"] and starts[0]["host"]


@pytest.mark.parametrize("micro, stop, plan, batches, passes", [
    # two forward passes per step, accumulated, each growing with B_e
    ({"train__micro_batch_size": 2}, 5, "batch 8 -> 4 (adaptive, tokens rule) in 2 passes of "
                                        "4 -> 2", [8, 6, 4], [2] * 8),
    # passes fitted to B_e = 12, 8, 6 (6 passes of 2, 8 of 1, 6 of 1; 2, 3 and 4 steps):
    # stopped mid-epoch 1, whose steps take 8 passes where B0 takes 6
    ({"train__micro_batch_size": 1, "train__batch_size": 6, "train__passes_per_step": "fit"},
     4, "batch 12 -> 6 (adaptive, tokens rule) in 6 to 8 passes of 2 -> 1", [12, 8, 6],
     [6, 6, 8, 8, 8, 6, 6, 6]),
], ids=["fixed-passes", "fitted-passes"])
def test_resume_reproduces_an_uninterrupted_run(shards, tmp_path, caplog, monkeypatch, micro,
                                                stop, plan, batches, passes):
    ran, accumulate = [], pretrain.accumulate_gradients  # the passes each step accumulated
    monkeypatch.setattr(pretrain, "accumulate_gradients",
                        lambda *args: ran.append(args[2]) or accumulate(*args))
    with caplog.at_level("INFO", logger="fastmavil.train"):
        run(shards, tmp_path / "a", train__max_steps=8, **micro)
    assert plan in caplog.text and ran == passes
    records = (tmp_path / "a" / "t" / "metrics.jsonl").read_text().splitlines()
    assert sorted({(r["epoch"], r["batch_size"]) for r in map(json.loads, records)}) == \
        list(enumerate(batches))
    run(shards, tmp_path / "b", train__max_steps=stop, **micro)  # stops mid-epoch
    assert load_latest(tmp_path / "b" / "t")[1]["step"] == stop
    summary = run(shards, tmp_path / "b", train__max_steps=8, **micro)
    assert summary["start_step"] == stop
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # bitwise on a CPU
    sa = load_latest(tmp_path / "a" / "t")[1]["model"]
    sb = load_latest(tmp_path / "b" / "t")[1]["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_resume_with_loader_workers_reproduces_an_uninterrupted_run(shards, tmp_path):
    """3 loader workers, a shard each, 2 passes of 4 per step: resumed after step 1, the loader
    passes over nothing (its first round holds 3 batches, the step took 2), and the trainer
    drops the 2 batches it fetches again."""
    loader = {"data__num_workers": 3, "train__micro_batch_size": 4, "train__ckpt_every": 1}
    run(shards, tmp_path / "a", train__max_steps=3, **loader)
    run(shards, tmp_path / "b", train__max_steps=1, **loader)
    run(shards, tmp_path / "b", train__max_steps=3, **loader)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [1, 2, 3] and [a[s] for s in (1, 2, 3)] == [b[s] for s in (1, 2, 3)]


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (its wheels are "
                                                 "for Linux x86_64 only)")
def test_the_dali_loader_trains_and_resumes_as_an_uninterrupted_run(shards, tmp_path, caplog):
    dali = {"data__loader": "dali", "data__dali_device": "cpu", "train__micro_batch_size": 2}
    with caplog.at_level("INFO", logger="fastmavil.train"):
        run(shards, tmp_path / "a", train__max_steps=8, **dali)
    assert "data: DALI decodes on the cpu" in caplog.text
    run(shards, tmp_path / "b", train__max_steps=5, **dali)  # stops mid-epoch 1
    assert run(shards, tmp_path / "b", train__max_steps=8, **dali)["start_step"] == 5
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 9)) and [a[s] for s in a] == [b[s] for s in a]
    assert all(math.isfinite(loss) for loss in a.values())


def test_a_checkpoints_save_is_not_counted_as_step_time(shards, tmp_path, monkeypatch):
    """The record after a checkpoint times its steps alone (the save, 2.9 GB at paper size,
    would count in its step_ms, samples/s and MFU)."""
    import fastmavil.train.checkpoint as checkpoint
    save = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda *args: time.sleep(3) or save(*args))
    run(shards, tmp_path, train__max_steps=4)  # a checkpoint at step 3, after its log record
    records = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # step 4 alone: ~120 ms here, over 1 s with the cores shared; the save would add 3 s
    assert records[3]["step_ms"] < 2000, records[3]


def test_checkpoints_come_every_ckpt_minutes_too(shards, tmp_path, monkeypatch):
    """train.ckpt_minutes: a checkpoint once that long has passed since the last, between the
    train.ckpt_every ones (here each step is 'a minute' on a stand-in clock)."""
    from fastmavil.train.checkpoint import CheckpointClock

    class MinutePerRead(CheckpointClock):
        minutes = iter(range(0, 10**6, 60))

        def now(self):
            return next(self.minutes)
    monkeypatch.setattr(pretrain, "CheckpointClock", MinutePerRead)
    run(shards, tmp_path, train__max_steps=4, train__ckpt_every=1000, train__ckpt_minutes=1.5,
        train__keep_checkpoints=10)
    names = [path.name for path in list_checkpoints(tmp_path / "t")]
    # the clock reads a minute later at each ask: due at every second step, and at the end
    assert names == [checkpoint_name(step) for step in (2, 4)]


def test_an_error_mid_step_keeps_the_steps_trained_since_the_last_checkpoint(shards, tmp_path,
                                                                             caplog, monkeypatch):
    """A loader worker killed, or out of memory, in step 5 of a run that checkpoints every 100
    steps: step 4 is checkpointed before the error ends the run, and the run resumes there."""
    accumulate, calls = pretrain.accumulate_gradients, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed.")
        return accumulate(*args)
    monkeypatch.setattr(pretrain, "accumulate_gradients", failing)
    with caplog.at_level("WARNING", logger="fastmavil.train"), \
            pytest.raises(RuntimeError, match="is killed by signal"):
        run(shards, tmp_path, train__max_steps=8, train__ckpt_every=100, train__log_every=3)
    assert "RuntimeError stopped step 5: checkpointing step 4 before stopping" in caplog.text
    # the checkpoint closed the log interval: step 4's record is kept
    assert list(losses(tmp_path)) == [3, 4]
    monkeypatch.setattr(pretrain, "accumulate_gradients", accumulate)
    assert run(shards, tmp_path, train__max_steps=8, train__log_every=3)["start_step"] == 4
    assert list(losses(tmp_path)) == [3, 4, 6, 8]
    # the kept record is step 4's, its learning rate too (not the failed step 5's)
    run(shards, tmp_path / "whole", train__max_steps=4)
    assert records(tmp_path)[1]["lr"] == records(tmp_path / "whole")[3]["lr"]


def test_an_error_after_an_epoch_ended_early_keeps_the_run_at_the_epochs_end(
        shards, tmp_path, caplog, monkeypatch):
    """Epoch 0's data ends at its second step (the schedule moves to epoch 1), then an error
    stops epoch 1's first step: the checkpoint and the record are at epoch 0's end, where the
    resumed run goes on as this one would have."""
    accumulate, calls = pretrain.accumulate_gradients, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise StopIteration
        if len(calls) == 3:
            raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed.")
        return accumulate(*args)
    monkeypatch.setattr(pretrain, "accumulate_gradients", failing)
    cfg = load_config(ROOT / "configs" / "demo.toml", overrides(shards, tmp_path))
    epoch_end = pretrain.first_step(1, pretrain.plan_epochs(cfg, count_clips(shards)))
    assert epoch_end > 2
    with caplog.at_level("WARNING", logger="fastmavil.train"), \
            pytest.raises(RuntimeError, match="is killed by signal"):
        run(shards, tmp_path, train__log_every=100, train__ckpt_every=100)
    assert (f"RuntimeError stopped step {epoch_end + 1}: checkpointing step {epoch_end} "
            "before stopping") in caplog.text
    assert list(losses(tmp_path)) == [epoch_end]
    monkeypatch.setattr(pretrain, "accumulate_gradients", accumulate)
    assert run(shards, tmp_path, train__max_steps=epoch_end + 1)["start_step"] == epoch_end
    assert list(losses(tmp_path)) == [epoch_end, epoch_end + 1]


def test_fitted_passes_without_micro_batches_say_they_change_nothing(shards, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="fastmavil.train"):
        run(shards, tmp_path, train__max_steps=1, train__passes_per_step="fit")
    assert ("train.passes_per_step = 'fit' changes nothing in this run: it fits the passes of "
            "the adaptive batch's steps, and this run has one pass per step") in caplog.text


def test_passes_of_one_clip_say_infonce_has_no_negatives(shards, tmp_path, caplog):
    # the adaptive batch of 8 -> 4 over 3 epochs: 2 clips a pass in epoch 0, then 1
    with caplog.at_level("WARNING", logger="fastmavil.train"):
        run(shards, tmp_path, train__max_steps=1, train__micro_batch_size=1)
    assert ("epochs 1-2 pass one clip at a time: InfoNCE has no negatives there and its terms "
            "are 0") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastmavil.train"):
        run(shards, tmp_path / "b", train__max_steps=1, train__micro_batch_size=1,
            loss__inter_weight=0, loss__intra_weight=0)
    assert "InfoNCE" not in caplog.text


def test_a_checkpoint_closes_the_log_interval(shards, tmp_path):
    """Checkpoints every 3 steps, records every 4: each checkpoint's step gets a record too, so
    a run resumed from one logs the same records as an uninterrupted run (before, the steps
    since the last record were lost with the crash)."""
    every = dict(train__log_every=4, train__ckpt_every=3)
    run(shards, tmp_path / "a", train__max_steps=8, **every)
    a = losses(tmp_path / "a")
    assert sorted(a) == [3, 4, 6, 8]
    run(shards, tmp_path / "b", train__max_steps=5, **every)  # ends at 5: as a crash after 3
    (tmp_path / "b" / "t" / "checkpoints" / "step-00000005.pt").unlink()
    run(shards, tmp_path / "b", train__max_steps=8, **every)
    assert losses(tmp_path / "b") == a


def test_settings_the_variant_never_reads_are_named(shards, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="fastmavil.train"):
        run(shards, tmp_path, train__max_steps=1, model__variant="audiomae",
            loss__intra_weight=0.1, diffusion__phi=0.5)
    assert ("model.variant = 'audiomae' never reads loss.intra_weight = 0.1, diffusion.phi = 0.5: "
            "they change nothing in this run") in caplog.text


def test_resume_refuses_a_config_that_trains_something_else(shards, tmp_path, caplog):
    run(shards, tmp_path, train__max_steps=3)
    saved = (tmp_path / "t" / "config.toml").read_text()
    with pytest.raises(ConfigError, match=r"step-00000003.pt was written under a different "
                       r"config \(mask.start: 0.9 -> 0.85; optim.lr: .*\); resume with"):
        run(shards, tmp_path, train__max_steps=4, optim__lr=3e-4, mask__start=0.85)
    assert (tmp_path / "t" / "config.toml").read_text() == saved  # left as the run's
    # under the adaptive batch the micro-batch size rounds every epoch's batch: refused
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: 0 -> 2"):
        run(shards, tmp_path, train__max_steps=4, train__micro_batch_size=2)
    with caplog.at_level("WARNING", logger="fastmavil.train"):
        summary = run(shards, tmp_path, train__max_steps=4, data__num_workers=1,
                      model__attention="math", train__log_every=2)
    assert summary["start_step"] == 3 and summary["step"] == 4
    assert "data.num_workers changed (0 -> 1)" in caplog.text  # other samples follow
    assert "model.attention" not in caplog.text  # the same attention: no warning


def test_resume_refuses_data_of_another_size(shards, tmp_path):
    run(shards, tmp_path / "run", train__max_steps=3)
    other = tmp_path / "other"
    synthesize(other, clips=16, heldout=0.0, clips_per_shard=8, workers=1,
               spec=SynthSpec(seconds=1.0, size=48, fps=8.0))
    with pytest.raises(ConfigError, match=r"trained on 24 clips, the data now holds 16"):
        run(other / "train", tmp_path / "run", train__max_steps=4)


def test_resume_refuses_a_schedule_planned_differently(shards, tmp_path, monkeypatch):
    """Same config and data, other planning code (e.g. a FLOP count that moved a batch across
    a rounding step): the resumed step would land elsewhere in the schedule."""
    run(shards, tmp_path, train__max_steps=3)
    real_plan = pretrain.plan_epochs

    def replanned(cfg, clips):
        plans = real_plan(cfg, clips)
        return [plans[0], dataclasses.replace(plans[1], batch_size=plans[1].batch_size + 2,
                                              steps=plans[1].steps - 1), *plans[2:]]

    monkeypatch.setattr(pretrain, "plan_epochs", replanned)
    with pytest.raises(ConfigError, match=r"step-00000003.pt was planned differently: epoch 1 "
                                          r"was rho 0.\d+, batch \d+, \d+ steps, now rho"):
        run(shards, tmp_path, train__max_steps=4)
    monkeypatch.setattr(pretrain, "plan_epochs", real_plan)
    assert run(shards, tmp_path, train__max_steps=4)["start_step"] == 3


def test_steps_an_epoch_has_no_data_for_are_not_reported_as_non_finite(shards, tmp_path,
                                                                       monkeypatch, caplog):
    """Each loader worker drops its last partial batch, so an epoch can end a step or two short
    of the plan; the trainer moves on, and must not log those steps as skipped updates."""
    real_loader = pretrain.build_loader
    monkeypatch.setattr(pretrain, "build_loader",
                        lambda *args: itertools.islice(real_loader(*args), 1))  # 1 step/epoch
    with caplog.at_level("WARNING", logger="fastmavil.train"):
        summary = run(shards, tmp_path)
    assert summary["step"] == summary["total_steps"] > 3  # every epoch ran short
    assert summary["trained_steps"] == 3  # one per epoch: the summary says how many
    table = _printed_summary(summary)
    assert (f"{summary['step']} / {summary['total_steps']} (this run from 0; 3 trained, "
            f"{summary['step'] - 3} passed over where an epoch's data ended early)") in table
    assert "non-finite" not in caplog.text
    # epochs 1 and 2 ended 3 and 5 steps short, more than partial batches explain
    assert caplog.text.count("clips were skipped") == 2
    records = (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 3  # one step played per epoch, each logged


def test_a_resume_past_its_epochs_data_is_not_reported_as_non_finite(shards, tmp_path,
                                                                       monkeypatch, caplog):
    """Resumed mid-epoch with a loader that now holds fewer batches (another worker count):
    the trainer moves to the next epoch, and those planned steps are no skipped updates."""
    run(shards, tmp_path, train__max_steps=2)
    real_loader, calls = pretrain.build_loader, []

    def loader(*args):
        calls.append(args)
        batches = real_loader(*args)
        return itertools.islice(batches, 1) if len(calls) == 1 else batches

    monkeypatch.setattr(pretrain, "build_loader", loader)
    with caplog.at_level("WARNING", logger="fastmavil.train"):
        summary = run(shards, tmp_path, train__max_steps=6)
    assert summary["start_step"] == 2 and summary["step"] == 6 and len(calls) > 1
    assert "non-finite" not in caplog.text


def test_the_steps_after_the_last_log_line_are_logged(shards, tmp_path, monkeypatch):
    """The last epoch's data runs a batch short of the plan, between log lines: the steps it ran
    still get their record, and the summary's loss is theirs."""
    real_loader, calls = pretrain.build_loader, []

    def all_but_last(batches):
        batches = iter(batches)
        held = next(batches)
        for batch in batches:
            yield held
            held = batch

    def loader(*args):
        calls.append(args)
        return all_but_last(real_loader(*args)) if len(calls) == 3 else real_loader(*args)

    monkeypatch.setattr(pretrain, "build_loader", loader)
    # no checkpoint before the end: a checkpoint would close the log interval too
    summary = run(shards, tmp_path, train__log_every=5, train__ckpt_every=1000)
    records = [json.loads(line)
               for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert len(calls) == 3 and summary["step"] == summary["total_steps"]
    assert records[-1]["step"] == summary["total_steps"] > records[-2]["step"]
    assert summary["last"] == records[-1]


def test_data_that_fails_mid_run_keeps_the_steps_trained(shards, tmp_path, monkeypatch):
    """Epoch 1's data gives nothing (the shards went away): the run stops with an error, but
    first checkpoints the steps of epoch 0, which no periodic checkpoint covered."""
    real_loader, calls = pretrain.build_loader, []

    def loader(*args):
        calls.append(args)
        return real_loader(*args) if len(calls) == 1 else iter(())

    monkeypatch.setattr(pretrain, "build_loader", loader)
    with pytest.raises(pretrain.DataError, match="epoch 1 gave not even one step"):
        run(shards, tmp_path, train__ckpt_every=100)
    path, state = load_latest(tmp_path / "t")
    assert state["step"] == 3 and path.name == "step-00000003.pt"  # epoch 0: 24 clips of 8


def test_a_second_trainer_in_a_run_directory_is_refused(shards, tmp_path):
    """While one trainer holds the run directory another would delete the checkpoint it is
    writing and rewrite its metrics: it stops at once, naming the holder."""
    from fastmavil.train.checkpoint import run_lock
    (tmp_path / "t").mkdir()
    with run_lock(tmp_path / "t"):
        with pytest.raises(TrainingError, match=rf"in use by another trainer "
                                                         rf"\(pid {os.getpid()}\)"):
            run(shards, tmp_path)
    assert not (tmp_path / "t" / "checkpoints").exists()
    assert run(shards, tmp_path, train__max_steps=1)["step"] == 1  # released


def test_a_log_line_spanning_epochs_counts_each_steps_own_work(shards, tmp_path):
    """One log line over the whole run (three epochs, three batch sizes and ratios): its
    visible tokens per sample are the steps' own, weighted by their samples, not the last
    epoch's."""
    from fastmavil.schedule import plan_epochs
    summary = run(shards, tmp_path, train__log_every=1000, train__ckpt_every=1000)
    (record,) = [json.loads(line)
                 for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    cfg = load_config(ROOT / "configs" / "demo.toml", overrides(shards, tmp_path))
    plans = plan_epochs(cfg, 24)
    assert summary["step"] == sum(p.steps for p in plans) and len({p.batch_size for p in plans}) > 1
    samples = sum(p.steps * p.batch_size for p in plans)
    tokens = sum(p.steps * p.batch_size * sum(cfg.model.visible_tokens(p.mask_ratio))
                 for p in plans)
    assert record["tokens_per_s"] / record["samples_per_s"] == pytest.approx(tokens / samples)
    assert tokens / samples != pytest.approx(sum(cfg.model.visible_tokens(plans[-1].mask_ratio)))


def test_sigterm_checkpoints_and_the_rerun_resumes(shards, tmp_path, capsys):
    args = [sys.executable, "-m", "fastmavil.train.pretrain", str(ROOT / "configs" / "demo.toml")]
    for k, v in overrides(shards, tmp_path, train__epochs=30).items():
        args += [f"--{k}", v]
    # in a process group of its own, signalled as a whole, as a scheduler does: the loader
    # workers get the SIGTERM too (tests/data/test_loader.py: they leave it to the trainer)
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            start_new_session=True)
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 2) \
            and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out
    # on one line, shell-quoted: pasted, it is the same command
    assert f"resume with: fastmavil-train {shlex.join(args[3:])}\n" in out
    step = load_latest(tmp_path / "t")[1]["step"]
    assert step >= 2
    summary = run(shards, tmp_path, train__epochs=30, train__max_steps=step + 2)
    assert summary["start_step"] == step and summary["step"] == step + 2
    # the summary says the plan is longer than this run's cap
    assert (f"planned steps    │ {summary['planned_steps']} (train.max_steps ends the run at "
            f"{step + 2})" in capsys.readouterr().err)


def test_non_finite_loss_is_skipped_then_stops(shards, tmp_path, monkeypatch, caplog):
    real_build = pretrain.build_model

    def nan_model(cfg):
        model = real_build(cfg)
        forward = model.forward

        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            out.loss = out.loss * float("nan")
            return out
        model.forward = poisoned
        return model

    run(shards, tmp_path, train__max_steps=3)
    before = load_latest(tmp_path / "t")[1]["model"]
    monkeypatch.setattr(pretrain, "build_model", nan_model)
    with pytest.raises(TrainingError, match=r"2 non-finite steps in a row at step 5; "
                                                     r"the newest checkpoint, .*step-00000003.pt"):
        run(shards, tmp_path, train__max_steps=10, train__max_bad_steps=2)
    with pytest.raises(TrainingError, match="at step 2; no checkpoint was written yet"):
        run(shards, tmp_path / "new", train__max_steps=10, train__max_bad_steps=2)
    assert "non-finite loss or gradient, update skipped" in caplog.text
    path, state = load_latest(tmp_path / "t")
    assert state["step"] == 3 and all(torch.equal(before[k], state["model"][k]) for k in before)


def test_clear_errors_before_training(tmp_path, shards, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="data.shards is empty"):
        run("", tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        run(tmp_path / "nowhere", tmp_path)
    with pytest.raises(ConfigError, match="no shards .*; datasets inside it: train"):
        run(shards.parent, tmp_path)  # the folder above the dataset
    with pytest.raises(ConfigError, match="fewer than one batch"):
        run(shards, tmp_path, train__batch_size=64)
    assert pretrain.main([str(ROOT / "configs" / "demo.toml"), "--mask.start", "1.5"]) == 2
    assert "mask.start = 1.5 must lie in (0, 1)" in capsys.readouterr().err
    assert pretrain.main([str(ROOT / "configs" / "demo.toml"), "--trian.epochs=3"]) == 2
    assert "unknown key trian" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train.cuda_graphs = true needs optim.optimizer"):
        run(shards, tmp_path, train__cuda_graphs="true", optim__optimizer="apex")
    with pytest.raises(ConfigError, match="train.cuda_graphs = true needs a CUDA device; "
                                          "this run is on cpu"):
        run(shards, tmp_path, train__cuda_graphs="true", train__device="cpu")
    with pytest.raises(ConfigError, match="max-autotune .* needs the Triton kernels"):
        run(shards, tmp_path, train__compile="true", train__compile_mode="max-autotune",
            train__device="cpu")
    with pytest.raises(ConfigError, match=r"train.residual_precision = 'bf16' needs bf16 "
                                          r"autocast; this run trains in fp32 \(train.precision "
                                          r"= 'auto' on cpu\)"):
        run(shards, tmp_path, train__residual_precision="bf16", train__device="cpu")
    with pytest.raises(ConfigError, match=r"data.random_clips = -1 must be >= 0"):
        run(shards, tmp_path, data__random_clips=-1)
    with pytest.raises(ConfigError, match=r"data.loader = 'nvdec': choose 'reference' or "
                                          r"'dali'"):
        run(shards, tmp_path, data__loader="nvdec")
    with monkeypatch.context() as m:
        m.setattr(pretrain, "dali_available", lambda: False)
        with pytest.raises(ConfigError, match=r"data.loader = 'dali' needs NVIDIA DALI"):
            run(shards, tmp_path, data__loader="dali")
    if dali_available() and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"data.dali_device = 'gpu' needs CUDA"):
            run(shards, tmp_path, data__loader="dali", data__dali_device="gpu")
    assert not (tmp_path / "t").exists()  # runs that never started leave no folder behind
    # overrides on either side of the config; one config only
    args, overrides = pretrain.parse_args(["--train.epochs", "3", "c.toml", "--run.name=2024"])
    assert (args.config, args.plan, overrides) == (
        "c.toml", False, {"train.epochs": "3", "run.name": "2024"})
    with pytest.raises(SystemExit):
        pretrain.parse_args(["c.toml", "d.toml"])
    assert "unrecognized arguments: d.toml" in capsys.readouterr().err


def test_a_bf16_residual_stream_trains_and_is_recorded(shards, tmp_path, monkeypatch):
    """train.residual_precision = bf16 (under the CPU's bf16 autocast here) reaches the model
    and the checkpoint's precision."""
    from fastmavil.models.mavil import MAViL
    dtypes = []
    original = MAViL.set_residual_dtype
    monkeypatch.setattr(MAViL, "set_residual_dtype",
                        lambda self, dtype: (dtypes.append(dtype), original(self, dtype)))
    summary = run(shards, tmp_path, train__precision="bf16", train__residual_precision="bf16",
                  train__max_steps=3)
    assert summary["step"] == 3 and dtypes == [torch.bfloat16]
    assert all(math.isfinite(loss) for loss in losses(tmp_path).values())
    assert load_latest(tmp_path / "t")[1]["precision"] == "bf16, bf16 residual"


def test_plan_prints_the_schedule_without_training(shards, tmp_path, capsys):
    """--plan: the schedule, per step its FLOPs and visible tokens and their spread over the
    epochs, for data.shards' clips or --data.random_clips N; nothing trains, no run folder."""
    from fastmavil.schedule import plan_epochs
    from fastmavil.train.plan_report import plan_summary
    args = ["--plan", "--data.random_clips", "1900000", "--model.size", "tiny",
            "--train.adaptive_batch_rule", "flops", "--train.passes_per_step", "fit",
            "--run.dir", str(tmp_path)]
    assert pretrain.main([str(ROOT / "configs" / "r4.toml"), *args]) == 0
    out = " ".join(capsys.readouterr().out.split())
    cfg = load_config(ROOT / "configs" / "r4.toml",
                      {key[2:]: value for key, value in zip(args[1::2], args[2::2])})
    summary = plan_summary(cfg, plan_epochs(cfg, 1_900_000))
    assert summary["tflop_spread"] < 0.005 < summary["token_spread"]
    assert (f"training FLOPs within ±{summary['tflop_spread']:.2%} of their mean, visible tokens "
            f"within ±{summary['token_spread']:.2%}") in out
    assert f"60 epochs of 1900000 clips, {summary['steps']} steps" in out
    first = summary["rows"][0]["plan"]
    assert f"{first.passes} x {first.micro_batch}" in out and "256 x 8" in out  # rho 0.9, 0.8
    assert not any(tmp_path.iterdir())
    # the clips of data.shards, counted, not decoded
    demo = [str(ROOT / "configs" / "demo.toml"), "--plan", "--run.dir", str(tmp_path)]
    assert pretrain.main([*demo, "--data.shards", str(shards)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "12 epochs of 24 clips" in out and "TFLOP in all" in out
    # the demo's data before its first run: the clips it will generate (300, 60 held out)
    assert pretrain.main([*demo, "--data.shards", str(tmp_path / "nowhere" / "train")]) == 0
    assert "12 epochs of 240 clips" in " ".join(capsys.readouterr().out.split())
    assert pretrain.main([*demo, "--data.shards", str(tmp_path / "nowhere" / "train"),
                          "--data.synth_clips", "0"]) == 2
    assert "does not exist (a demo config generates it on its first run)" in \
        capsys.readouterr().err
    assert pretrain.main([*demo, "--data.shards", "", "--data.synth_clips", "0"]) == 2
    assert "data.shards = '' is empty: --plan counts its clips" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_random_clips_train_without_data_and_resume_exactly(tmp_path, caplog):
    """data.random_clips: no shards at all (data.shards names nothing), every planned step
    runs, and a run resumed mid-epoch gives the uninterrupted run's losses bit for bit."""
    nowhere, clips = tmp_path / "no-data", {"data__random_clips": 12}
    with caplog.at_level("INFO", logger="fastmavil.train"):
        summary = run(nowhere, tmp_path / "a", train__max_steps=6, **clips)
    assert "12 random clips per epoch held in memory" in caplog.text
    assert summary["step"] == 6 and not nowhere.exists()
    # the plan: 1 step of 8 (epoch 0), 2 of 6, 3 of 4 (epoch 2), one pass each
    run(nowhere, tmp_path / "b", train__max_steps=1, **clips)  # at an epoch's end
    run(nowhere, tmp_path / "b", train__max_steps=4, **clips)  # after epoch 2's first step
    run(nowhere, tmp_path / "b", train__max_steps=6, **clips)  # resumed mid-epoch
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 7)) and [a[s] for s in a] == [b[s] for s in a]
    assert len(set(a.values())) == 6


def test_triton_attention_without_the_kernels_says_what_runs(tmp_path, caplog):
    """model.attention = "triton" where the kernels are off (here: no CUDA) trains with auto's
    attention and says so."""
    with caplog.at_level("INFO", logger="fastmavil.train"):
        summary = run(tmp_path / "no-data", tmp_path / "a", train__max_steps=1,
                      data__random_clips=8, model__attention="triton")
    assert summary["step"] == 1
    assert "model.attention = 'triton' runs the Triton kernels, which are off here" in caplog.text


def _printed_summary(summary: dict) -> str:
    from rich.console import Console
    console = Console(record=True, width=200, file=open(os.devnull, "w"))
    pretrain._print_summary(console, summary, [])
    return console.export_text()


def test_the_summary_names_what_ended_the_run(shards, tmp_path):
    summary = run(shards, tmp_path, train__max_steps=2)
    table = _printed_summary(summary)
    assert "2 / 2 (this run from 0)" in table and "passed over" not in table
    assert f"{summary['planned_steps']} (train.max_steps ends the run at 2)" in table
    summary["interrupted"] = "SIGTERM"
    assert "stopped by SIGTERM at step 2; resume with" in _printed_summary(summary)


def test_an_interrupt_outside_the_training_loop_is_one_line(capsys):
    """Ctrl-C while the demo data is generated (or a second one mid-step): one line and exit
    130, not a traceback."""
    from fastmavil.train.runtime import run_command

    def interrupted(cfg, world):
        raise KeyboardInterrupt
    load = lambda: load_config(ROOT / "configs" / "demo.toml",  # noqa: E731
                               {"data.random_clips": "8"})
    assert run_command("fastmavil-train", "configs/demo.toml", load, interrupted) == 130
    assert capsys.readouterr().err == ("fastmavil-train: interrupted; the same command goes on "
                                       "from what was saved\n")


def test_bad_shards_are_errors_not_an_empty_run(shards, tmp_path):
    """A path that is no tar file, an index listing a shard that is gone, and shards that are all
    unreadable: each stops the run with an error naming the data, instead of a run that
    'finishes' its planned steps having trained on nothing."""
    import shutil
    garbage = tmp_path / "notatar.tar"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ConfigError, match=r"notatar.tar': not a readable tar file"):
        run(garbage, tmp_path / "r0")
    folder = tmp_path / "junk"  # a folder of shards without an index: the bad one is named
    folder.mkdir()
    (folder / "shard-000000.tar").write_bytes(os.urandom(4096))
    with pytest.raises(ConfigError, match=r"junk': not a readable tar file \(shard-000000.tar: "):
        run(folder, tmp_path / "r0b")
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    tars = sorted(copy.glob("*.tar"))
    tars[1].unlink()
    with pytest.raises(ConfigError, match=rf"1 of the 3 shards its index lists are missing: "
                                          rf"{tars[1].name}"):
        run(copy, tmp_path / "r1")
    for tar in tars:
        tar.write_bytes(os.urandom(4096))
    with pytest.raises(TrainingError, match="epoch 0 gave not even one step"):
        run(copy, tmp_path / "r2")
    assert not list_checkpoints(tmp_path / "r2" / "t")
    # resumed mid-epoch onto shards that have since become unreadable: the resumed epoch cannot
    # tell that from data that ran out (its skipped clips are not read), the next one can
    run(shards, tmp_path / "r3", train__max_steps=1)
    with pytest.raises(pretrain.DataError, match="epoch 1 gave not even one step"):
        run(copy, tmp_path / "r3")
    assert load_latest(tmp_path / "r3" / "t")[1]["step"] == 1  # no step claimed untrained


def test_a_resume_after_a_crash_logs_each_step_once(shards, tmp_path):
    """A crash after step 5 loses the steps since the checkpoint at 3 (here: that run's final
    checkpoint removed); the resumed run replays 4 and 5, and its log holds each step once."""
    run(shards, tmp_path, train__max_steps=5)
    (tmp_path / "t" / "checkpoints" / "step-00000005.pt").unlink()
    assert run(shards, tmp_path, train__max_steps=8)["start_step"] == 3
    lines = (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))


def test_a_resume_on_another_device_type_reseeds_the_masking_rng(shards, tmp_path, caplog):
    """train.device may change on resume; a CUDA generator's state (16 bytes) does not load into
    a CPU generator, so the run reseeds it and says so rather than crashing."""
    run(shards, tmp_path, train__max_steps=3)
    path = tmp_path / "t" / "checkpoints" / "step-00000003.pt"
    state = torch.load(path, weights_only=False)
    state["generator"] = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA state
    torch.save(state, path)
    with caplog.at_level("WARNING", logger="fastmavil.train"):
        summary = run(shards, tmp_path, train__max_steps=5)
    assert summary["start_step"] == 3 and summary["step"] == 5
    assert "written on another device type" in caplog.text


def test_the_non_finite_streak_remembers_a_streak_that_ended_between_checks():
    from fastmavil.train.runtime import NonFiniteStreak
    streak = NonFiniteStreak(torch.device("cpu"))
    for finite in (False, False, True, False):  # 2 in a row, ended before the check
        streak.update(torch.tensor(finite))
    streak.check(3, 4, None)  # under the limit: counts afresh from the current streak (1)
    streak.update(torch.tensor(False))
    with pytest.raises(TrainingError, match="2 non-finite steps in a row at step 5; no checkpoint"):
        streak.check(2, 5, None)
    with pytest.raises(TrainingError, match="the newest checkpoint, c.pt, is intact"):
        streak.check(2, 5, Path("c.pt"))
