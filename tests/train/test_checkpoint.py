import os
import random

import numpy as np
import pytest
import torch

from fastmavil.train import checkpoint as ckpt


def test_keeps_the_newest_k(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000030.pt",
                                                                 "step-00000040.pt"]
    path, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 40 and path.name == "step-00000040.pt"
    assert ckpt.load_latest(tmp_path / "none") is None


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1, "w": torch.ones(3)}, keep=3)

    def dying_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(ckpt.CheckpointError, match=r"step-00000002.pt could not be written "
                       r"\(OSError: disk full\); the checkpoints before it are intact"):
        ckpt.save_checkpoint(tmp_path, 2, {"step": 2}, keep=3)
    # the partial file is gone at once: it would hold the disk space the next save needs
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    monkeypatch.undo()
    path, state = ckpt.load_latest(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_a_checkpoint_too_large_for_memory_now_is_left_in_place(tmp_path, monkeypatch):
    """The allocator refusing a request the file's size can hold says nothing about the file:
    it is neither set aside as damaged nor skipped for an older one."""
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, keep=2)
    ckpt.save_checkpoint(tmp_path, 2, {"step": 2}, keep=2)

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 64 bytes. Error code 12")
    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(ckpt.CheckpointError, match="step-00000002.pt does not fit in memory "
                                                   "now .*; left as it is"):
        ckpt.load_latest(tmp_path)
    monkeypatch.undo()
    assert ckpt.load_latest(tmp_path)[1]["step"] == 2


def test_a_damaged_newest_checkpoint_falls_back_and_is_set_aside(tmp_path, caplog):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, keep=1)
    (tmp_path / "checkpoints" / "step-00000002.pt").write_bytes(b"garbage")
    assert ckpt.load_latest(tmp_path)[1]["step"] == 1
    assert "step-00000002.pt does not load" in caplog.text
    # the damaged file no longer counts among the newest K: the next save keeps itself
    ckpt.save_checkpoint(tmp_path, 3, {"step": 3}, keep=1)
    assert ckpt.load_latest(tmp_path)[1]["step"] == 3
    assert (tmp_path / "checkpoints" / "step-00000002.pt.bad").exists()


def test_a_reader_of_a_run_in_training_changes_nothing(tmp_path, caplog):
    """Fine-tuning from a run folder reads it while its trainer may be writing: the checkpoint
    being written (.tmp) stays, and a damaged one is passed over, not renamed. The trainer's
    next save removes a crash's leftover .tmp."""
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, keep=3)
    folder = tmp_path / "checkpoints"
    (folder / "step-00000003.pt.tmp").write_bytes(b"being written")
    (folder / "step-00000002.pt").write_bytes(b"garbage")
    assert ckpt.load_latest(tmp_path, owner=False)[1]["step"] == 1
    assert "step-00000002.pt does not load" in caplog.text
    assert {p.name for p in folder.iterdir()} == {
        "step-00000001.pt", "step-00000002.pt", "step-00000003.pt.tmp"}
    ckpt.save_checkpoint(tmp_path, 4, {"step": 4}, keep=3)
    assert not list(folder.glob("*.tmp"))


def test_the_run_lock_dies_with_its_trainer_not_with_forked_children(tmp_path):
    """A flock belongs to the open file, which forked children (DataLoader workers) share: they
    close their copies, so a killed trainer's lock is free at once, while its workers live on."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent(f"""
        import os, signal, time
        from fastmavil.train.checkpoint import run_lock
        with run_lock({str(tmp_path)!r}):
            child = os.fork()
            if child == 0:  # a worker outliving its trainer (off the test's output pipe)
                os.close(1)
                os.close(2)
                time.sleep(30)
                os._exit(0)
            print(child, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # the trainer dies holding the lock
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    child = int(done.stdout.split()[0])
    try:
        with ckpt.run_lock(tmp_path):  # free, with the child still alive
            os.kill(child, 0)
    finally:
        os.kill(child, 9)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.999])
def test_a_truncated_newest_checkpoint_is_set_aside(tmp_path, cut):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, keep=2)
    ckpt.save_checkpoint(tmp_path, 2, {"step": 2, "w": torch.randn(64, 64)}, keep=2)
    newest = tmp_path / "checkpoints" / "step-00000002.pt"
    newest.write_bytes(newest.read_bytes()[:int(newest.stat().st_size * cut)])
    assert ckpt.load_latest(tmp_path)[1]["step"] == 1
    assert newest.with_name(newest.name + ".bad").exists()


@pytest.mark.parametrize("error", [TypeError("_rebuild_tensor_v3() missing 'dtype'"),
                                   AssertionError("saved_id must be a tuple"), MemoryError(),
                                   LookupError("unknown encoding: matin1"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you "
                                                "tried to allocate 72057594037927936 bytes.")])
def test_whatever_a_corrupted_file_raises_sets_it_aside(tmp_path, monkeypatch, error):
    """Flipped bits in a checkpoint surface as many exception types; each is damage, not a
    traceback: the file is set aside and the one before loads."""
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, keep=2)
    ckpt.save_checkpoint(tmp_path, 2, {"step": 2}, keep=2)
    real_load = torch.load

    def load(path, *args, **kwargs):
        if str(path).endswith("step-00000002.pt"):
            raise error
        return real_load(path, *args, **kwargs)
    monkeypatch.setattr(torch, "load", load)
    assert ckpt.load_latest(tmp_path)[1]["step"] == 1
    assert (tmp_path / "checkpoints" / "step-00000002.pt.bad").exists()


@pytest.mark.parametrize("error, message", [
    (OSError(5, "Input/output error"), "cannot be read"),
    (ModuleNotFoundError("No module named 'numpy._core'"), "does not load with this code")])
def test_a_checkpoint_that_fails_for_other_reasons_stays_in_place(tmp_path, monkeypatch, error,
                                                                   message):
    """An I/O error or a missing module says nothing about the file: it must not be renamed
    .bad and passed over for an older one."""
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, keep=2)
    ckpt.save_checkpoint(tmp_path, 2, {"step": 2}, keep=2)

    def failing_load(*args, **kwargs):
        raise error
    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(ckpt.CheckpointError, match=f"step-00000002.pt {message}"):
        ckpt.load_latest(tmp_path)
    assert not list((tmp_path / "checkpoints").glob("*.bad"))


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, keep=1)
    (tmp_path / "checkpoints" / "step-00000001.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="holds checkpoints but none loads"):
        ckpt.load_latest(tmp_path)


def test_rng_state_round_trip():
    state = ckpt.rng_state(torch.device("cpu"))
    assert "cuda" not in state  # a CPU run keeps no CUDA state, CUDA present or not
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state, torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_rng_state_keeps_the_training_devices_cuda_generator_only():
    """Only the training device's CUDA state is kept, so a run resumes with fewer GPUs visible;
    an older checkpoint's list of every device's state is read at the device's index."""
    device = torch.device("cuda", torch.cuda.current_device())
    state = ckpt.rng_state(device)
    assert isinstance(state["cuda"], torch.Tensor)
    draws = torch.rand(4, device=device)
    ckpt.set_rng_state(state, device)
    assert torch.equal(torch.rand(4, device=device), draws)
    older = {**state, "cuda": [state["cuda"]] * (device.index + 1)}
    ckpt.set_rng_state(older, device)
    assert torch.equal(torch.rand(4, device=device), draws)
    ckpt.set_rng_state({**state, "cuda": []}, device)  # saved with fewer devices: not restored
    assert not torch.equal(torch.rand(4, device=device), draws)


def test_a_checkpoint_is_due_every_n_steps_and_once_the_minutes_have_passed():
    now = [100.0]

    class Clock(ckpt.CheckpointClock):
        def now(self):
            return now[0]

    class World:  # one process: its own clock decides
        def any(self, flag):
            return flag
    clock = Clock(every=5, minutes=1, world=World())
    now[0] += 59
    assert not clock.due(1)
    now[0] += 1
    assert clock.due(2)  # a minute since the start
    clock.reset()
    assert not clock.due(3) and clock.due(5)  # and every 5 steps
    assert Clock(5, 0, World()).due(10) and not Clock(5, 0, World()).due(11)  # 0: steps only

    class LateElsewhere(World):  # another process's clock says it is time: all checkpoint
        def any(self, flag):
            return True
    assert Clock(5, 1, LateElsewhere()).due(1)
