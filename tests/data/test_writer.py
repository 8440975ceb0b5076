"""The shard-writing pipeline of fastmavil-prep and fastmavil-synth: worker processes that die."""
import json
import os
import signal
import time

import pytest

from fastmavil.data.shards import read_shard
from fastmavil.data.writer import write_shards


def _clip(item: int):
    """A clip maker whose process dies on item 2, as under the OOM killer."""
    if item == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return f"clip{item}", {"json": {"item": item}}


@pytest.fixture
def deadline():
    """Fails the test after 120 s instead of hanging the suite (the old pool waited forever)."""
    def expire(*_):
        raise TimeoutError("write_shards still waiting after 120 s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_worker_that_dies_fails_its_item_not_the_run(tmp_path, deadline):
    index = write_shards(tmp_path, list(range(6)), _clip, str, [], clips_per_shard=3, workers=2)
    keys = [clip.key for shard in sorted(tmp_path.glob("shard-*.tar"))
            for clip in read_shard(shard)]
    assert keys == ["clip0", "clip1", "clip3", "clip4", "clip5"]  # in order, the rest kept
    assert index["clips"] == 5 and index["failed"] == 1
    assert '2,"its worker process died (killed by the OS' in (tmp_path / "failures.csv").read_text()


def _double(item: int):
    return f"clip{item}", {"json": {"item": 2 * item}}


def test_a_worker_that_died_idle_between_shards_does_not_end_the_run(deadline):
    """The OOM killer may pick a worker with nothing to do: the next shard's jobs find the
    pool broken, and go to a fresh one."""
    from fastmavil.data.writer import _Workers
    workers = _Workers(2)
    try:
        jobs = [(_double, i) for i in range(4)]
        assert [r[1]["json"]["item"] for r in workers.map(jobs)] == [0, 2, 4, 6]
        # one worker, as the OOM killer would (killing each in turn raced with the pool, which
        # ends the others once one dies)
        process = next(iter(workers.pool._processes.values()))
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        assert [r[1]["json"]["item"] for r in workers.map(jobs)] == [0, 2, 4, 6]
    finally:
        workers.close()


def _sigint_handler(item: int):
    return f"clip{item}", {"json": {"handler": str(signal.getsignal(signal.SIGINT))}}


def test_workers_leave_ctrl_c_to_the_parent(tmp_path, deadline):
    """The terminal sends Ctrl-C to the whole process group: the workers ignore it (each
    would print a KeyboardInterrupt traceback), the parent stops and ends them."""
    # Python's handler, as under a terminal (a shell's background job starts with it ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        write_shards(tmp_path, list(range(4)), _sigint_handler, str, [], clips_per_shard=4,
                     workers=2)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the parent's
    finally:
        signal.signal(signal.SIGINT, before)
    handlers = {json.loads(clip.members["json"])["handler"]
                for clip in read_shard(tmp_path / "shard-000000.tar")}
    assert handlers == {str(signal.SIG_IGN)}


def _slow(item: int):
    time.sleep(60)
    return f"clip{item}", {}


@pytest.mark.parametrize("alone", [False, True])
def test_ctrl_c_ends_the_workers_at_once(alone):
    """The workers ignore Ctrl-C, so the parent must end them: in the pool, and in the fresh
    process that retries a job alone after a worker died (there, leaving a `with` block waited
    for the job)."""
    from fastmavil.data.writer import _Workers

    def interrupt(*_):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGALRM, interrupt)
    workers, started = _Workers(2), time.monotonic()
    signal.alarm(3)  # the spawned worker has started the job by then
    try:
        with pytest.raises(KeyboardInterrupt):
            if alone:
                workers._alone((_slow, 0))
            else:
                try:
                    list(workers.map([(_slow, 0), (_slow, 1)]))
                finally:
                    workers.close()  # write_shards' finally
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 20  # not the job's 60 s
