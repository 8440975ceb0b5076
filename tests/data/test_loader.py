"""The reference loader on generated shards, bad clips included."""
import logging
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

from fastmavil.data.loader import (LoaderSpec, ShardDataset, build_loader, loader_spec,
                                   round_robin)
from fastmavil.data.media import encode_flac, encode_video
from fastmavil.data.shards import ShardWriter, read_shard, shard_clips
from fastmavil.data.video import pick_frames, sample_times, shown_until
from fastmavil.data.synth import SynthSpec, make_clip

from .clips import SPEC, SYNTH, flac, good, raw_tar, write_dataset


def test_bad_clips_are_repaired_or_skipped_and_counted(bad_shard, caplog):
    dataset = ShardDataset(bad_shard, LoaderSpec(**{**SPEC.__dict__, "train": False}))
    with caplog.at_level(logging.INFO, logger="fastmavil.data"):
        samples = {s["key"]: s for s in dataset}
    assert set(samples) == {"good", "truncated_video", "short", "stereo_44k", "wrong_duration",
                            "caf\ufffd"}
    # a zero-length FLAC does not even parse: it counts as corrupt
    assert dict(dataset.skipped) == {"corrupt video": 1, "corrupt audio": 2, "missing audio": 1,
                                     "missing json": 1, "audio too short": 1}
    for s in samples.values():
        assert s["audio"].shape == (1, 128, 64) and s["video"].shape == (3, 4, 32, 32)
        assert torch.isfinite(s["audio"]).all() and torch.isfinite(s["video"]).all()
    # short audio is zero-padded (before normalisation) after its 28 fbank frames
    pad = (0 - SPEC.audio_mean) / (2 * SPEC.audio_std)
    assert torch.allclose(samples["short"]["audio"][0, 28:], torch.tensor(pad))
    assert not torch.allclose(samples["short"]["audio"][0, :28], torch.tensor(pad))
    # the two frames of the short video repeat to fill four
    video = samples["short"]["video"]
    assert torch.equal(video[:, 0], video[:, 1]) and torch.equal(video[:, 2], video[:, 3])
    text = caplog.text
    assert "skipping shard-000000.tar/corrupt_video: corrupt video" in text
    assert "skipping shard-000000.tar/missing_json: missing json" in text
    assert "stereo_44k: downmixed 2 channels" in text and "resampled 44100 Hz" in text
    assert "skipping shard-000000.tar/tiny_audio: audio too short: 160 samples" in text
    assert "6 skipped" in text


def test_an_unforeseen_error_in_one_clip_skips_it(tmp_path, caplog):
    _, ok = good(0)
    raw_tar(tmp_path / "shard-000000.tar", [
        ("odd.webm", ok["webm"]), ("odd.flac", ok["flac"]), ("odd.json", b'{"duration": "x"}'),
        ("list.webm", ok["webm"]), ("list.flac", ok["flac"]), ("list.json", b"[1, 2]"),
        ("fine.webm", ok["webm"]), ("fine.flac", ok["flac"]), ("fine.json", b"{}")])
    dataset = ShardDataset(tmp_path, LoaderSpec(**{**SPEC.__dict__, "train": False}))
    assert [s["key"] for s in dataset] == ["fine"]
    assert dict(dataset.skipped) == {"decode error": 1, "corrupt json": 1}
    assert "skipping shard-000000.tar/odd: decode error: ValueError" in caplog.text
    assert "skipping shard-000000.tar/list: corrupt json: a list, not an object" in caplog.text


def test_truncated_shard_yields_the_clips_before_the_damage(tmp_path, caplog):
    with ShardWriter(tmp_path / "shard-000000.tar") as writer:
        for i in range(4):
            writer.add(*good(i))
    data = (tmp_path / "shard-000000.tar").read_bytes()
    (tmp_path / "shard-000000.tar").write_bytes(data[: int(len(data) * 0.6)])
    dataset = ShardDataset(tmp_path, LoaderSpec(**{**SPEC.__dict__, "train": False}))
    keys = [s["key"] for s in dataset]
    assert keys[:2] == ["synth000000", "synth000001"] and len(keys) < 4
    assert sum(dataset.skipped.values()) >= 1


@pytest.mark.parametrize("damage", ["header", "cut in a header"])
def test_a_damaged_tar_header_loses_no_silent_clips(tmp_path, caplog, damage):
    """tarfile takes a bad member header, or a file cut inside one, for the archive's end and
    raises nothing: the rest of the shard would vanish unwarned. A bad header is passed over
    (only its clip is lost); a cut is counted against the index and warned of."""
    write_dataset(tmp_path, 6, 6)
    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path) as tar:
        header = [m.offset for m in tar.getmembers() if m.name.startswith("synth000002")][0]
    data = bytearray(path.read_bytes())
    if damage == "header":
        data[header + 148] ^= 0xFF  # the header's checksum field
    else:
        data = data[:header + 100]
    path.write_bytes(bytes(data))
    dataset = ShardDataset(tmp_path, LoaderSpec(**{**SPEC.__dict__, "train": False}))
    keys = [s["key"] for s in dataset]
    if damage == "header":  # one member of clip 2 lost: it is skipped, every other clip read
        assert keys == [f"synth00000{i}" for i in (0, 1, 3, 4, 5)]
        assert sum(dataset.skipped.values()) == 1
        # a folder without an index is counted as it is read: past the bad header
        (tmp_path / "index.json").unlink()
        assert shard_clips(tmp_path) == {path: 6}
    else:
        assert keys == ["synth000000", "synth000001"]
        assert dict(dataset.skipped) == {"damaged shard": 4}
        assert "skipping shard-000000.tar/*: damaged shard: 4 of its 6 clips not read" in \
            caplog.text


def test_each_pass_reports_its_own_skips(tmp_path, caplog):
    """In one process (no loader workers, or DALI) the skip counts go on over the passes; each
    pass's warning gives that pass's count and reasons."""
    _, ok = good(0)
    raw_tar(tmp_path / "shard-000000.tar", [
        ("list.webm", ok["webm"]), ("list.flac", ok["flac"]), ("list.json", b"[1]"),
        ("fine.webm", ok["webm"]), ("fine.flac", ok["flac"]), ("fine.json", b"{}")])
    dataset = ShardDataset(tmp_path, LoaderSpec(**{**SPEC.__dict__, "train": False}))
    list(dataset)
    caplog.clear()
    (tmp_path / "shard-000000.tar").unlink()
    raw_tar(tmp_path / "shard-000000.tar", [
        ("bare.webm", ok["webm"]), ("bare.flac", ok["flac"]),
        ("fine.webm", ok["webm"]), ("fine.flac", ok["flac"]), ("fine.json", b"{}")])
    with caplog.at_level("WARNING", logger="fastmavil.data"):
        list(dataset)
    assert "2 clips read, 1 skipped (missing json: 1)" in caplog.text
    assert dict(dataset.skipped) == {"corrupt json": 1, "missing json": 1}


def test_audio_segment_holds_the_video_window():
    """A waveform longer than the fbank's 1024 frames (10.255 s) is cut to a segment that long
    holding the video window (or inside it, if longer): random in training, centred otherwise,
    inside the waveform."""
    from fastmavil.data.loader import audio_samples, audio_segment
    need, rate = audio_samples(1024), 16000
    assert need == 164_080 and audio_samples(128) == 20_720
    rng = np.random.default_rng(0)
    assert audio_segment(need, 1024, (2.0, 4.0), True, rng) == slice(None)  # AudioSet's 10 s
    samples = 30 * rate
    for train in (True, False):
        for _ in range(50 if train else 1):
            cut = audio_segment(samples, 1024, (13.0, 4.0), train, rng)
            assert cut.stop - cut.start == need and 0 <= cut.start <= samples - need
            assert cut.start <= 13 * rate and cut.stop >= 17 * rate
    centred = audio_segment(samples, 1024, (13.0, 4.0), False, rng)
    assert centred.start == (17 * rate - need + 13 * rate) // 2
    # a window past the waveform's end (a wrong duration): the segment stays inside
    assert audio_segment(samples, 1024, (40.0, 4.0), False, rng).stop == samples
    # a video window longer than the audio's: inside it (the demo: 1.3 s of audio, 4 s clips)
    for train in (True, False):
        for _ in range(50 if train else 1):
            inside = audio_segment(samples, 128, (10.0, 4.0), train, rng)
            assert 10 * rate <= inside.start and inside.stop <= 14 * rate
    assert inside.start == 10 * rate + (4 * rate - audio_samples(128)) // 2  # centred
    # audio alone: anywhere in training, the middle otherwise
    assert audio_segment(samples, 1024, None, False, rng).start == (samples - need) // 2


def test_a_long_clips_audio_and_video_show_the_same_moment(tmp_path):
    """30 s clip, sound only from 12 s to 18 s; the 1 s video window, centred in evaluation, is
    14.5-15.5 s, so the audio heard must be the loud part (the first 1.3 s, as before, is
    silent)."""
    rate, seconds = 16000, 30
    t = np.arange(seconds * rate) / rate
    wave = np.where((t >= 12) & (t < 18), 0.3 * np.sin(2 * np.pi * 440 * t), 0.0)
    video = encode_video(np.full((seconds * 2, 32, 32, 3), 90, np.uint8), 2.0)
    raw_tar(tmp_path / "shard-000000.tar", [("long.webm", video), ("long.flac", encode_flac(wave)),
                                            ("long.json", b'{"duration": 30.0}')])
    (sample,) = ShardDataset(tmp_path, LoaderSpec(**{**SPEC.__dict__, "train": False}))
    assert sample["audio"].shape == (1, 128, 64) and sample["video"].shape == (3, 4, 32, 32)
    # silence sits at the log floor, (log(eps) - mean) / (2 std) = -1.27 after normalising
    assert float(sample["audio"].amax(-1).min()) > 0.0  # the tone in every frame


def test_batches_labels_and_normalisation(dataset_dir):
    dataset = ShardDataset(dataset_dir, SPEC)
    batches = list(build_loader(dataset, batch_size=4, num_workers=0))
    assert len(batches) == 3
    b = batches[0]
    assert b["audio"].shape == (4, 1, 128, 64) and b["video"].shape == (4, 3, 4, 32, 32)
    assert b["labels"].shape == (4, 10) and (b["labels"].sum(1) == 1).all()
    assert len(b["keys"]) == 4
    for batch in batches:
        for key, labels in zip(batch["keys"], batch["labels"]):
            expected = make_clip(int(key[5:]), SYNTH, "train")[1]["json"]["labels"][0]
            assert dataset.labels[int(labels.argmax())] == expected


def test_leftover_shards_spread_over_the_ranks(tmp_path):
    """6 shards for 2 ranks x 2 workers: the 2 left over after a round go one to each rank (an
    epoch of several processes ends when the smallest share does)."""
    write_dataset(tmp_path, 6, 1)
    shares = [sum(ShardDataset(tmp_path, SPEC, rank=r, world_size=2)._worker_clips(2))
              for r in range(2)]
    assert shares == [3, 3]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_every_clip_once_per_epoch_across_workers_and_ranks(dataset_dir):
    keys = []
    for rank in range(2):
        dataset = ShardDataset(dataset_dir, SPEC, rank=rank, world_size=2)
        for batch in build_loader(dataset, batch_size=2, num_workers=2, drop_last=False):
            keys += batch["keys"]
    assert sorted(keys) == [f"synth{i:06d}" for i in range(12)]
    # fewer shards (4) than consumers (2 ranks x 3 workers): clips are split instead
    keys = []
    for rank in range(2):
        dataset = ShardDataset(dataset_dir, SPEC, rank=rank, world_size=2)
        keys += [k for b in build_loader(dataset, 2, num_workers=3, drop_last=False)
                 for k in b["keys"]]
    assert sorted(keys) == [f"synth{i:06d}" for i in range(12)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("world_size", [1, 2])
def test_too_few_shards_are_dealt_a_batch_at_a_time(tmp_path, world_size):
    """41 clips in 1 shard, batches of 4, 4 workers per rank: dealt one clip at a time each
    worker would drop its own partial batch (10 batches of 41 clips with one rank); a batch at a
    time only the epoch's last partial one is lost."""
    write_dataset(tmp_path, 41, 41)
    batches = []
    for rank in range(world_size):
        dataset = ShardDataset(tmp_path, SPEC, rank=rank, world_size=world_size)
        dataset.set_epoch(0, batch_size=4, num_workers=4)
        rank_batches = [b["keys"] for b in build_loader(dataset, 4, num_workers=4)]
        # the shares set_epoch plans a resume with are the ones delivered
        assert len(rank_batches) == sum(c // 4 for c in dataset._worker_clips(4))
        batches += rank_batches
    assert len(batches) == 10 and all(len(keys) == 4 for keys in batches)
    assert len({k for keys in batches for k in keys}) == 40


def test_training_shuffles_per_epoch_and_evaluation_is_fixed(dataset_dir):
    def order(train, epoch):
        dataset = ShardDataset(dataset_dir, LoaderSpec(**{**SPEC.__dict__, "train": train}))
        dataset.set_epoch(epoch)
        return [s["key"] for s in dataset]
    assert order(True, 0) == order(True, 0)
    assert order(True, 0) != order(True, 1)
    assert order(False, 0) == order(False, 1) == [f"synth{i:06d}" for i in range(12)]


def test_random_roll_and_window_only_in_training(dataset_dir):
    def first(train, epoch):
        dataset = ShardDataset(dataset_dir, LoaderSpec(**{**SPEC.__dict__, "train": train,
                                                         "shuffle_buffer": 1}))
        dataset.set_epoch(epoch)
        return next(iter(dataset))
    a, b = first(False, 0), first(False, 1)
    assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["video"], b["video"])
    dataset = ShardDataset(dataset_dir, LoaderSpec(**{**SPEC.__dict__, "shuffle_buffer": 1}))
    clip = next(read_shard(dataset.shards[0]))
    rolled = [dataset.decode(clip, np.random.default_rng(s))["audio"] for s in range(2)]
    assert not torch.equal(rolled[0], rolled[1])


def test_video_window_is_random_in_training_and_centred_in_evaluation(tmp_path):
    """A 3 s clip with a 1 s window (square frames at the crop size: only the window moves)."""
    key, members = make_clip(3, SynthSpec(seconds=3.0, size=48, fps=8.0), "train")
    with ShardWriter(tmp_path / "shard-000000.tar") as writer:
        writer.add(key, members)

    def video(train, seed):
        spec = LoaderSpec(**{**SPEC.__dict__, "video_size": 48, "video_frames": 8,
                             "roll": False, "train": train})
        dataset = ShardDataset(tmp_path, spec)
        clip = next(read_shard(dataset.shards[0]))
        return dataset.decode(clip, np.random.default_rng(seed))["video"]
    assert all(torch.equal(video(False, 0), video(False, seed)) for seed in (1, 2))
    trained = [video(True, seed) for seed in range(4)]
    assert all(not torch.equal(trained[0], other) for other in trained[1:])


def test_frames_are_sampled_until_the_last_one_stops_showing():
    """Without a duration the sampled span ends a frame period after the last frame's start,
    so the last frame gets its share of the samples (it got fewer than the others)."""
    times = np.arange(4) / 4.0  # 4 frames at 4 fps
    assert shown_until(times) == 1.0 and shown_until(np.array([2.0])) == 3.0
    picked = pick_frames(sample_times(0.0, shown_until(times), 8), times)
    assert picked.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_the_shuffle_buffer_holds_encoded_clips(dataset_dir, monkeypatch):
    """A clip is decoded as it leaves the buffer: the first sample costs one decode, not a
    buffer's worth (decoded clips are ~100x their encoded size)."""
    dataset = ShardDataset(dataset_dir, LoaderSpec(**{**SPEC.__dict__, "shuffle_buffer": 6}))
    decoded, real = [], dataset.decode
    monkeypatch.setattr(dataset, "decode", lambda clip, rng: decoded.append(1) or real(clip, rng))
    samples = iter(dataset)
    next(samples)
    assert len(decoded) == 1
    assert len(list(samples)) == 11 and len(decoded) == 12


def test_audio_only_mode_skips_video(dataset_dir, tmp_path):
    spec = LoaderSpec(**{**SPEC.__dict__, "audio_only": True})
    sample = next(iter(ShardDataset(dataset_dir, spec)))
    assert "video" not in sample and sample["audio"].shape == (1, 128, 64)
    # a clip without video is fine when only audio is read
    raw_tar(tmp_path / "shard-000000.tar", [("a.flac", flac(1.0)), ("a.json", b"{}")])
    assert [s["key"] for s in ShardDataset(tmp_path, spec)] == ["a"]


def test_loader_spec_follows_the_config():
    from fastmavil.config import Config, ModelConfig
    cfg = Config(model=ModelConfig(size="tiny", variant="audiomae")).check()
    spec = loader_spec(cfg, train=False)
    assert (spec.audio_frames, spec.mel_bins, spec.video_size) == (128, 128, 48)
    assert spec.audio_only and not spec.train and spec.audio_mean == -4.268


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards"):
        ShardDataset(tmp_path, SPEC)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("workers, resume, drop", [(0, 3, 0), (2, 3, 1), (3, 2, 2), (3, 4, 0)])
def test_a_resumed_epoch_passes_over_its_batches_without_decoding_them(dataset_dir, workers,
                                                                         resume, drop,
                                                                         monkeypatch):
    """Resumed after `resume` batches of 2, the loader (plus the batches set_epoch says to drop,
    the rest of a round of workers) delivers what an uninterrupted epoch delivers from there
    on: the same clips with the same rolls, windows and crops. 4 shards of 3 clips: 2 workers
    get 3 batches each; 3 workers get 3, 1 and 1, so worker 0 delivers the last two alone."""
    spec = LoaderSpec(**{**SPEC.__dict__, "shuffle_buffer": 5})
    whole, resumed, dropped = _resumed_batches(dataset_dir, spec, workers, resume)
    assert len(whole) == (5 if workers == 3 else 6) and dropped == drop
    _assert_same_batches(whole[resume:], resumed)
    if workers == 0:  # in this process, where the decodes can be counted
        dataset = ShardDataset(dataset_dir, spec)
        decoded, real = [], dataset.decode
        monkeypatch.setattr(dataset, "decode",
                            lambda clip, rng: decoded.append(1) or real(clip, rng))
        dataset.set_epoch(1, resume, batch_size=2)
        assert len(list(dataset)) == len(decoded) == 12 - 2 * resume
    with pytest.raises(ValueError, match="resume_batches = -1"):
        ShardDataset(dataset_dir, spec).set_epoch(0, resume_batches=-1)


@pytest.mark.parametrize("per_shard, rank, resume", [(6, 0, 4), (6, 1, 5), (22, 0, 4),
                                                     (22, 1, 3)])
def test_a_resumed_epoch_on_one_of_two_ranks(tmp_path, per_shard, rank, resume):
    """Rank `rank` of 2, 2 workers each, 22 clips: in shards of 6, 6, 6, 4 each worker reads one
    shard, so the ranks' workers hold unequal shares; in 1 shard the workers take a batch of 2
    clips each in turn (consumers worker-major: rank 0's workers 6 and 6 clips, rank 1's 6 and
    4). Either way the resumed epoch goes on as the uninterrupted one."""
    write_dataset(tmp_path, 22, per_shard)
    spec = LoaderSpec(**{**SPEC.__dict__, "shuffle_buffer": 2})
    whole, resumed, _ = _resumed_batches(tmp_path, spec, 2, resume, rank=rank, world_size=2)
    assert len(whole) >= resume + 1
    _assert_same_batches(whole[resume:], resumed)


def _resumed_batches(source, spec, workers, resume, **ranks):
    """(an uninterrupted epoch's batches of 2, the resumed epoch's after its dropped ones, the
    number dropped)."""
    def batches(resume):
        dataset = ShardDataset(source, spec, **ranks)
        drop = dataset.set_epoch(1, resume, batch_size=2, num_workers=workers)
        return list(build_loader(dataset, 2, num_workers=workers))[drop:], drop
    (whole, _), (resumed, drop) = batches(0), batches(resume)
    return whole, resumed, drop


def _assert_same_batches(expected, got):
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["video"], b["video"])


def test_a_dataloader_takes_a_batch_from_each_worker_with_data_left_in_turn():
    assert list(round_robin([3, 1, 2])) == [[0, 1, 2], [0, 2], [0]]
    assert list(round_robin([0, 2])) == [[1], [1]]
    assert list(round_robin([])) == []


def test_a_loader_worker_leaves_ctrl_c_to_the_trainer(dataset_dir):
    """Ctrl-C reaches every process of the group; the trainer stops after its step and shuts its
    workers down, so a worker ignores it (each used to log the trainer's stop message)."""
    sig = signal.SIGINT
    dataset = ShardDataset(dataset_dir, SPEC)

    class Probe(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield signal.getsignal(sig) == signal.SIG_IGN

    loader = build_loader(dataset, 1, num_workers=1)
    probe = torch.utils.data.DataLoader(Probe(), num_workers=1,
                                        worker_init_fn=loader.worker_init_fn)
    # A handler of the trainer's kind in this process, whatever the runner left (a shell's
    # background job starts with SIGINT ignored): the workers inherit it and must ignore it.
    def handler(*_):
        pass

    previous = signal.signal(sig, handler)
    try:
        seen = [bool(flag) for flag in probe]
        assert seen == [True] and signal.getsignal(sig) is handler
    finally:
        signal.signal(sig, previous)


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"),
                    reason="no sigwaitinfo on this OS: a worker ignores every SIGTERM there")
def test_a_loader_worker_ends_on_the_trainers_sigterm_only(dataset_dir):
    """A SIGTERM from another process (a scheduler's, to the whole group) leaves a worker to the
    trainer's shutdown; the trainer's own, the DataLoader's terminate() for a worker that did not
    stop when asked (here one stuck in a decoder), ends it: ignored, the trainer's exit waited
    on the worker."""

    class Stuck(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield 0
            while True:  # a decoder that never returns
                time.sleep(0.05)

    loader = build_loader(ShardDataset(dataset_dir, SPEC), 1, num_workers=1)
    batches = iter(torch.utils.data.DataLoader(Stuck(), num_workers=1,
                                               worker_init_fn=loader.worker_init_fn))
    assert next(batches) == 0
    (worker,) = batches._workers
    try:
        subprocess.run([sys.executable, "-c", f"import os, signal; os.kill({worker.pid}, "
                        "signal.SIGTERM)"], check=True)
        time.sleep(1)
        assert worker.is_alive() and worker.exitcode is None
        batches._shutdown_workers()  # asks, waits 5 s for the worker, then terminate()
        worker.join(timeout=10)
        assert not worker.is_alive() and worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
