import json
from pathlib import Path

import numpy as np
import pytest

from fastmavil.data.media import decode_audio, decode_video
from fastmavil.data.shards import read_index, read_shard
from fastmavil.data.synth import (SOUNDS, SynthSpec, class_names, main, make_clip,
                                  synthesize, synthesized)

ROOT = Path(__file__).resolve().parents[2]
SPEC = SynthSpec(seconds=2.0, size=48, fps=8.0)


def test_classes_are_distinct_and_stable():
    names = class_names(10)
    assert len(set(names)) == 10 and names[0] == "tone-red-circle-left_right"
    assert {n.split("-")[0] for n in names} == set(SOUNDS)
    assert len(set(class_names(40))) == 40
    with pytest.raises(ValueError, match="--classes 1000"):
        class_names(1000)


def test_clip_is_deterministic_and_audio_video_follow_the_event():
    key, members = make_clip(7, SPEC, "train")
    assert make_clip(7, SPEC, "train") == (key, members)
    assert make_clip(8, SPEC, "train")[1]["flac"] != members["flac"]
    meta = members["json"]
    onset, offset = meta["event"]
    wave, _ = decode_audio(members["flac"])
    frames, times = decode_video(members["webm"])
    assert wave.shape == (32000,) and frames.shape == (16, 48, 48, 3)
    # the class sound is loud during the event and quiet outside it
    t = np.arange(len(wave)) / 16000
    inside, outside = (t >= onset) & (t < offset), (t < onset - 0.05) | (t >= offset + 0.05)
    assert np.abs(wave[inside]).mean() > 2 * np.abs(wave[outside]).mean()
    # the coloured object shows only while the sound plays: saturated pixels
    saturation = frames.max(-1).astype(int) - frames.min(-1)
    coloured = (saturation > 80).sum(axis=(1, 2))
    during = (times >= onset + 0.13) & (times < offset - 0.13)
    away = (times < onset - 0.13) | (times >= offset + 0.13)
    if "white" not in meta["labels"][0]:
        assert coloured[during].min() > 0 and coloured[away].max() == 0


def test_cli_writes_train_and_heldout_and_resumes(tmp_path, capsys):
    out = tmp_path / "synth"
    args = ["--out", str(out), "--clips", "10", "--heldout", "0.2", "--seconds", "1",
            "--size", "32", "--clips-per-shard", "4", "--workers", "1"]
    assert main(args) == 0
    assert "train: 8 clips in 2 shard(s), 0 failed" in capsys.readouterr().out
    train, heldout = read_index(out / "train"), read_index(out / "heldout")
    assert (train["clips"], heldout["clips"]) == (8, 2)
    assert train["labels"] == class_names(10)
    clips = [c for s in train["shards"] for c in read_shard(out / "train" / s["name"])]
    assert len({c.key for c in clips}) == 8
    assert all(json.loads(c.members["json"])["split"] == "train" for c in clips)
    first = (out / "train" / "shard-000000.tar").stat().st_mtime_ns
    (out / "train" / "shard-000001.tar").unlink()
    assert main(args) == 0  # resumes: shard 0 kept, shard 1 rewritten
    assert "kept 1 of the 2 shards, which an earlier run had finished" in \
        " ".join(capsys.readouterr().out.split())
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == first
    assert read_index(out / "train")["clips"] == 8
    assert (out / "train" / "shard-000001.tar").exists()


@pytest.mark.parametrize("args, message", [
    (["--size", "33"], "--size 33 must be even"),
    (["--heldout", "1.5"], "--heldout 1.5 must be in [0, 1)"),
    (["--clips-per-shard", "0"], "--clips-per-shard 0 must be >= 1"),
    (["--classes", "0"], "--classes 0 must be >= 1"), (["--clips", "0"], "--clips 0 must be >= 1"),
    (["--out-is-a-file"], "is a file, not a folder")])
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    if args == ["--out-is-a-file"]:
        out.write_text("")
        args = []
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_sidecar_that_does_not_read_has_its_shard_written_again(tmp_path, capsys):
    """A crash mid-write of a shard's .meta.json, or a damaged one: named, and the shard is
    written again, rather than every rerun stopping at a JSON error."""
    out = tmp_path / "synth"
    args = ["--out", str(out), "--clips", "4", "--heldout", "0", "--seconds", "1", "--size",
            "32", "--clips-per-shard", "2", "--workers", "1"]
    assert main(args) == 0
    sidecar = out / "train" / "shard-000001.meta.json"
    sidecar.write_text('{"name": "shard-0')
    capsys.readouterr()
    assert main(args) == 0
    assert f"{sidecar}: does not read" in capsys.readouterr().err
    assert json.loads(sidecar.read_text())["clips"] == 2
    assert read_index(out / "train")["clips"] == 4


def test_a_rerun_with_other_clips_rewrites_the_shards_it_changes(tmp_path, capsys):
    """Shards are reused only for the same items and options: 20 then 40 clips into one folder
    (another train/heldout split) must not mix the two runs' shards."""
    out = tmp_path / "synth"
    args = ["--out", str(out), "--heldout", "0.2", "--seconds", "1", "--size", "32",
            "--clips-per-shard", "5", "--workers", "1"]
    assert main(args + ["--clips", "20"]) == 0
    assert main(args + ["--clips", "40"]) == 0
    assert "written for other items or options" in capsys.readouterr().out
    keys = {}
    for split in ("train", "heldout"):
        index = read_index(out / split)
        keys[split] = [c.key for s in index["shards"] for c in read_shard(out / split / s["name"])]
        assert len(keys[split]) == len(set(keys[split])) == index["clips"]
    assert (len(keys["train"]), len(keys["heldout"])) == (32, 8)
    assert not set(keys["train"]) & set(keys["heldout"])


def test_prepare_data_finishes_an_interrupted_first_use(tmp_path):
    """The demo generates its data on first use; a Ctrl-C in the held-out split left the
    training split whole: the next run finishes the held-out one instead of training without
    it (the fine-tuning demo scores on it)."""
    from fastmavil.config import load_config
    from fastmavil.train.runtime import prepare_data
    root = tmp_path / "demo"
    cfg = load_config(ROOT / "configs" / "demo.toml",
                      {"data.shards": str(root / "train"), "data.synth_clips": "5"})
    assert prepare_data(cfg) == root / "train" and synthesized(root, 5)
    (root / "heldout" / "index.json").unlink()
    assert not synthesized(root, 5)
    prepare_data(cfg)
    assert read_index(root / "heldout")["clips"] == 1
    # too few clips for a held-out one: the training split alone is the whole dataset
    assert synthesize(tmp_path / "two", clips=2, spec=SPEC).keys() == {"train"}
    assert synthesized(tmp_path / "two", 2, spec=SPEC)


def test_prepare_data_makes_the_demo_data_again_for_another_count(tmp_path):
    """A demo folder made for 5 clips is not the dataset of 6: it is rewritten (the shards that
    still match are kept), not trained on as it is. Another data.seed, which also seeds the
    loader, keeps the clips."""
    from fastmavil.config import load_config
    from fastmavil.train.runtime import prepare_data
    root = tmp_path / "demo"
    config = {"data.shards": str(root / "train"), "data.synth_clips": "5"}
    prepare_data(load_config(ROOT / "configs" / "demo.toml", config))
    assert synthesized(root, 5) and not synthesized(root, 6)
    assert not synthesized(root, 5, spec=SynthSpec(seed=1))
    six = {**config, "data.synth_clips": "6"}
    prepare_data(load_config(ROOT / "configs" / "demo.toml", six))
    assert synthesized(root, 6) and read_index(root / "train")["clips"] == 5  # 1 held out
    prepare_data(load_config(ROOT / "configs" / "demo.toml", {**six, "data.seed": "1"}))
    assert synthesized(root, 6, spec=SynthSpec(seed=0))


def test_ctrl_c_ends_the_cli_in_one_line(tmp_path, capsys, monkeypatch):
    import fastmavil.data.synth as synth

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(synth, "synthesize", interrupted)
    assert main(["--out", str(tmp_path / "s")]) == 130
    assert capsys.readouterr().err == ("fastmavil-synth: interrupted; the same command goes on "
                                       "from the shards it finished\n")
