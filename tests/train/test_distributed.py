"""Pre-training in several processes (torchrun, gloo on the CPU): every rank's share of the
passes, gradients averaged once per step, one checkpoint with every rank's streams, and a
resume that goes on as the uninterrupted run."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmavil.config import ConfigError, load_config
from fastmavil.data.dali_loader import dali_available
from fastmavil.data.synth import SynthSpec, synthesize
from fastmavil.train import pretrain
from fastmavil.train.checkpoint import list_checkpoints, run_lock
from fastmavil.train.distributed import OtherProcessFailed, World

from .test_pretrain import overrides as pretrain_overrides

ROOT = Path(__file__).resolve().parents[2]


def overrides(shards, run_dir, **extra):
    """test_pretrain's small demo run, in passes of 2 (two a step, one per process, at
    rho = 0.8)."""
    return pretrain_overrides(shards, run_dir, **{"train__micro_batch_size": 2, **extra})


def torchrun(shards, run_dir, processes=2, main=("-m", "fastmavil.train.pretrain"), **extra):
    """fastmavil-train configs/demo.toml in `processes` processes (`main`: what runs it);
    returns the completed process (its output checked by the caller)."""
    args = [f"--{k}={v}" for k, v in overrides(shards, run_dir, **extra).items()]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*launcher, *main, str(ROOT / "configs" / "demo.toml"), *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def losses(run_dir):
    lines = (Path(run_dir) / "t" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_two_processes_train_checkpoint_and_resume_as_one_uninterrupted_run(shards, tmp_path):
    whole = torchrun(shards, tmp_path / "a", train__max_steps=8)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "x 2 processes" in whole.stderr  # MFU against both processes' peak
    assert whole.stderr.count("[rank 0] INFO") > 0 and "[rank 1] INFO" not in whole.stderr
    state = torch.load(list_checkpoints(tmp_path / "a" / "t")[-1],
                                     weights_only=False)
    assert len(state["ranks"]) == 2  # each rank's masking stream, for the resume
    assert state["ranks"][0]["generator"].ne(state["ranks"][1]["generator"]).any()
    first = torchrun(shards, tmp_path / "b", train__max_steps=5)  # stopped mid-epoch 1
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(shards, tmp_path / "b", train__max_steps=8)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = losses(tmp_path / "a")
    # rank 1's one shard ends each epoch a step early on both ranks (the plan's last step has
    # no record): uneven shares end together instead of leaving rank 0 waiting
    assert 3 not in expected and len(expected) >= 4 and max(expected) == 8
    assert losses(tmp_path / "b") == expected  # bit for bit


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (its wheels are "
                    "for Linux x86_64)")
def test_the_dali_loader_in_two_processes_resumes_as_an_uninterrupted_run(shards, tmp_path):
    """Each process's DALI pipeline reads its share of the shards (on the CPU here: VP9 and
    FLAC), and an interrupted, resumed run trains as an uninterrupted one, bit for bit."""
    dali = {"data__loader": "dali", "data__dali_device": "cpu"}
    whole = torchrun(shards, tmp_path / "a", train__max_steps=8, **dali)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "data: DALI decodes on the cpu" in whole.stderr
    first = torchrun(shards, tmp_path / "b", train__max_steps=5, **dali)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(shards, tmp_path / "b", train__max_steps=8, **dali)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = losses(tmp_path / "a")
    assert len(expected) >= 4 and losses(tmp_path / "b") == expected


def test_graphed_passes_in_two_processes_train_as_distributed_data_parallel(tmp_path):
    """train.cuda_graphs under torchrun: the model itself runs the passes (no DDP hooks), with
    rank 0's parameters, each rank its share of the passes (2 of a step's 4, accumulated), and
    one average of the gradient buffers a step. Its passes run eagerly here
    (graphed_passes_run_eagerly.py: the CPU cannot capture), and train as DDP's, bit for bit:
    the same losses and gradient norms (a missing average or a wrong share of the passes would
    change the norm). Rank 1's shard of 7 clips ends each epoch one pass into a step, whose
    gradients must be dropped from the buffers too."""
    synthesize(tmp_path / "data", clips=21, heldout=0.0, clips_per_shard=7, workers=1,
               spec=SynthSpec(seconds=1.0, size=48, fps=8.0))
    shards = tmp_path / "data" / "train"
    passes = {"train__max_steps": 8, "train__micro_batch_size": 1}  # 4 passes a step
    ddp = torchrun(shards, tmp_path / "ddp", **passes)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    graphed = torchrun(shards, tmp_path / "graphed", **passes, train__cuda_graphs="true",
                       main=[str(Path(__file__).with_name("graphed_passes_run_eagerly.py"))])
    assert graphed.returncode == 0, graphed.stderr[-3000:]
    assert "replayed as CUDA graphs" in graphed.stderr
    records = {}
    for name in ("ddp", "graphed"):
        lines = (tmp_path / name / "t" / "metrics.jsonl").read_text().splitlines()
        records[name] = {r["step"]: (r["batch_size"], r["loss"], r["grad_norm"])
                         for r in map(json.loads, lines)}
    assert records["graphed"] == records["ddp"]


def test_a_resume_in_another_number_of_processes_says_the_streams_are_reseeded(shards,
                                                                                tmp_path):
    assert torchrun(shards, tmp_path, train__max_steps=2).returncode == 0
    alone = torchrun(shards, tmp_path, processes=1, train__max_steps=4)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "written by 2 process(es), this run has 1" in alone.stderr
    # back in two processes, with a loader change: each warning every rank gives alike is
    # said once, by rank 0
    pair = torchrun(shards, tmp_path, train__max_steps=6, data__num_workers=1)
    assert pair.returncode == 0, pair.stderr[-3000:]
    for warning in ("written by 1 process(es), this run has 2",
                    "resuming with data.num_workers changed (0 -> 1)"):
        assert pair.stderr.count(warning) == 1 and "[rank 0] WARNING" in pair.stderr, \
            pair.stderr[-3000:]


def _children(pid):
    """(pid, RANK) of the processes `pid` started (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        ranks = [int(v[5:]) for v in environ if v.startswith(b"RANK=")]
        if parent == pid and ranks:
            found.append((int(entry.name), ranks[0]))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")
def test_a_signal_to_one_process_stops_both_after_the_same_step(shards, tmp_path):
    args = [f"--{k}={v}" for k, v in overrides(shards, tmp_path, train__epochs=40,
                                               train__ckpt_every=1000).items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "fastmavil.train.pretrain", str(ROOT / "configs" / "demo.toml"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert launcher.poll() is None and time.monotonic() < deadline, "no steps logged"
        time.sleep(0.2)
    (rank_1,) = [pid for pid, rank in _children(launcher.pid) if rank == 1]
    os.kill(rank_1, signal.SIGTERM)  # rank 0 gets no signal
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, err[-3000:]
    found = re.search(r"stopped by a signal to another process at step (\d+)", err)
    assert found, err[-3000:]
    step = int(found.group(1))  # both stopped there: the run's end is checkpointed
    assert list_checkpoints(tmp_path / "t")[-1].name == f"step-{step:08d}.pt"
    assert step < 40 * 3  # long before the plan's end
    # the command printed to resume is torchrun's, in as many processes (not one, reseeded)
    assert ("resume with: torchrun --standalone --nproc_per_node 2 -m fastmavil.train.pretrain "
            f"{ROOT / 'configs' / 'demo.toml'} --data.shards=") in out + err, out[-2000:]


@pytest.mark.parametrize("variant", ["mavil", "audiomae"])
def test_every_variant_trains_in_two_processes(shards, tmp_path, variant):
    done = torchrun(shards, tmp_path, model__variant=variant, train__max_steps=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(losses(tmp_path)) == {1, 2}


SAME_STREAMS = """
import sys
from fastmavil.train import pretrain
pretrain.rank_seed = lambda seed, rank: seed  # every rank: rank 0's clips and masks
sys.exit(pretrain.main(sys.argv[1:]))
"""


def test_the_gradient_is_the_mean_over_every_processes_passes(tmp_path):
    """Two processes drawing the same random clips and masks step as one process with half
    their batch: the same loss and gradient norm (a wrong share of the passes would scale it)."""
    script = tmp_path / "same_streams.py"
    script.write_text(SAME_STREAMS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = {}
    for processes, batch in ((2, 8), (1, 4)):
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable])
        args = {"data.random_clips": 16, "train.adaptive_batch": "false",
                "mask.schedule": "fixed", "mask.start": 0.8, "mask.end": 0.8,
                "train.batch_size": batch,
                "train.micro_batch_size": 2, "train.max_steps": 1, "train.log_every": 1,
                "train.deterministic": "true", "run.dir": tmp_path / str(processes),
                "run.name": "t"}
        done = subprocess.run([*launcher, str(script), str(ROOT / "configs" / "demo.toml"),
                               *[f"--{k}={v}" for k, v in args.items()]],
                              capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        record = json.loads((tmp_path / str(processes) / "t" / "metrics.jsonl").read_text())
        first[processes] = (record["loss"], record["grad_norm"])
    assert first[2] == pytest.approx(first[1], rel=1e-6)


def test_a_failure_on_one_process_stops_every_process_with_one_line_each(shards, tmp_path):
    """Rank 0 alone takes the run folder's lock: when another trainer holds it, both processes
    stop with a line saying why, neither with a traceback from a collective left waiting."""
    (tmp_path / "t").mkdir()
    with run_lock(tmp_path / "t"):
        done = torchrun(shards, tmp_path)
    assert done.returncode != 0
    assert "in use by another trainer" in done.stderr
    # the one traceback is torchrun's own report of a failed process, none from gloo
    assert done.stderr.count("Traceback") == 1 and "ChildFailedError" in done.stderr
    assert "gloo" not in done.stderr.lower() and "Connection closed" not in done.stderr
    assert "fastmavil-train [rank 1]: another process failed taking the run folder" in \
        done.stderr


def test_other_ranks_leave_out_the_warnings_every_rank_gives(monkeypatch):
    import logging
    from fastmavil.train.distributed import SAME_ON_EVERY_RANK, leave_out_repeats
    handler, seen = logging.Handler(), []
    handler.emit = lambda record: seen.append(record.getMessage())
    # the root logger with this handler alone: the filter must not reach pytest's handlers
    monkeypatch.setattr(logging.getLogger(), "handlers", [handler])
    leave_out_repeats()  # as on rank 1
    log = logging.getLogger("fastmavil.train")
    log.warning("the config changed", extra=SAME_ON_EVERY_RANK)
    log.warning("this rank's shard is unreadable")
    assert seen == ["this rank's shard is unreadable"]


def test_the_resume_command_is_the_launch_it_resumes(monkeypatch):
    from fastmavil.train.distributed import resume_command
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resume_command("fastmavil-train", "m", ["a b.toml", "--x=1"]) == \
        "fastmavil-train 'a b.toml' --x=1"
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    several_nodes = resume_command("fastmavil-train", "fastmavil.train.pretrain", ["c.toml"])
    assert several_nodes == (
        "torchrun --nnodes 2 --nproc_per_node 8 -m fastmavil.train.pretrain c.toml  # on every "
        "node, with the rendezvous flags this run was started with")
    assert subprocess.run(["bash", "-n", "-c", several_nodes]).returncode == 0  # pastes


def test_agreements_raise_on_every_process_and_ranks_draw_their_own_streams():
    class Pair(World):  # rank `rank` of 2, the other rank's outcome given
        def __init__(self, rank, other_ok):
            super().__init__(rank=rank, size=2)
            self.other_ok = other_ok

        def all(self, flag):
            return flag and self.other_ok
    Pair(1, True).agree(None, "x")  # nobody failed
    with pytest.raises(OtherProcessFailed, match="another process failed writing"):
        Pair(1, other_ok=False).agree(None, "writing")
    own = ValueError("disk full")
    with pytest.raises(ValueError, match="disk full"):
        Pair(0, other_ok=True).agree(own, "writing")
    # torch's own stream (stochastic depth) differs per rank; rank 0's is the seed's
    from fastmavil.config import TrainConfig
    draws = []
    for rank in range(3):
        pretrain.setup_runtime(TrainConfig(seed=5, device="cpu"), None, rank)
        draws.append(float(torch.rand(())))
    torch.manual_seed(5)
    assert draws[0] == float(torch.rand(())) and len(set(draws)) == 3


def test_passes_the_processes_cannot_share_are_a_config_error(shards, tmp_path):
    # B0 4 in passes of 4: one pass a step at rho 0.8, which two processes cannot split
    cfg = load_config(ROOT / "configs" / "demo.toml", {
        k: str(v) for k, v in overrides(shards, tmp_path, train__micro_batch_size=4).items()})
    class Unjoined(World):  # rank 0 of 2 without a process group: agrees with itself
        def all(self, flag):
            return flag
    with pytest.raises(ConfigError, match="2 processes cannot share evenly"):
        pretrain._training_data(cfg, Unjoined(rank=0, size=2))


def test_the_even_passes_check_names_the_first_epoch_the_processes_cannot_share():
    from fastmavil.schedule import EpochPlan
    from fastmavil.train.runtime import check_even_passes
    plans = [EpochPlan(0, 0.9, 16, 8, 1), EpochPlan(1, 0.85, 24, 8, 1), EpochPlan(2, 0.8, 40, 8, 1)]
    check_even_passes(plans[:1], 2)
    with pytest.raises(ConfigError, match=r"^epoch 1's steps take 3 passes of 8 samples, which 2 "
                                          r"processes cannot share evenly: .* multiple of 2 "
                                          r"\(with train.passes_per_step = 'fixed'\)$"):
        check_even_passes(plans, 2)
    with pytest.raises(ConfigError, match=r"is a multiple of 2$"):  # fine-tuning: no such key
        check_even_passes(plans[1:2], 2, fixed_passes=False)
