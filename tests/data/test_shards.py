import json
import tarfile

import pytest

from fastmavil.data.shards import (ShardWriter, read_index, read_shard, shard_paths, split_key,
                                   write_index)


def test_writer_reader_round_trip_and_tarfile(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with ShardWriter(path) as writer:
        writer.add("a", {"flac": b"1", "webm": b"22", "json": {"labels": ["x"]}})
        writer.add("dir/b", {"flac": b"3", "json": {}})
    assert not (tmp_path / "shard-000000.tar.tmp").exists()
    clips = list(read_shard(path))
    assert [(c.key, sorted(c.members)) for c in clips] == [("a", ["flac", "json", "webm"]),
                                                          ("dir/b", ["flac", "json"])]
    assert json.loads(clips[0].members["json"]) == {"labels": ["x"]}
    with tarfile.open(path) as tar:  # plain tarfile reads it too
        assert tar.getnames() == ["a.flac", "a.json", "a.webm", "dir/b.flac", "dir/b.json"]
        assert {m.mtime for m in tar} == {0}


def test_failed_writer_leaves_no_shard(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as writer:
            writer.add("a", {"flac": b"1"})
            raise RuntimeError("crash mid-shard")
    assert list(tmp_path.iterdir()) == []


def test_keys_have_no_dots():
    assert split_key("dir.v1/clip.flac") == ("dir.v1/clip", "flac")
    assert split_key("clip.tar.gz") == ("clip", "tar.gz")
    with pytest.raises(ValueError, match="must not contain a dot"):
        ShardWriter.add(None, "clip.v2", {})


def test_index_and_shard_discovery(tmp_path):
    for i in range(2):
        with ShardWriter(tmp_path / f"shard-00000{i}.tar") as writer:
            writer.add(f"k{i}", {"flac": b"x"})
    index = write_index(tmp_path, [{"name": "shard-000001.tar", "clips": 1, "bytes": 1},
                                   {"name": "shard-000000.tar", "clips": 1, "bytes": 1}], ["l"])
    assert index["clips"] == 2 and read_index(tmp_path)["labels"] == ["l"]
    assert [p.name for p in shard_paths(tmp_path)] == ["shard-000000.tar", "shard-000001.tar"]
    (tmp_path / "index.json").unlink()
    assert len(shard_paths(tmp_path)) == 2                       # a folder of shards
    assert shard_paths(tmp_path / "shard-000001.tar") == [tmp_path / "shard-000001.tar"]
    with pytest.raises(FileNotFoundError, match="no dataset index"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(ValueError, match="index.json: not valid JSON"):
        read_index(tmp_path)


def test_dali_webdataset_reader_reads_the_shards(tmp_path):
    dali = pytest.importorskip("nvidia.dali", reason="needs nvidia-dali (Linux x86_64 wheels)")
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    from fastmavil.data.synth import SynthSpec, make_clip
    path = tmp_path / "shard-000000.tar"
    spec = SynthSpec(seconds=1.0, size=32, fps=8.0)
    with ShardWriter(path) as writer:
        for i in range(2):
            writer.add(*make_clip(i, spec, "train"))

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)  # CPU only: VP9 and FLAC
    def pipe():
        video, audio, meta = fn.readers.webdataset(paths=[str(path)], ext=["webm", "flac", "json"],
                                                   missing_component_behavior="error")
        frames = fn.decoders.video(video, device="cpu")
        wave, rate = fn.decoders.audio(audio, dtype=types.FLOAT, downmix=True)
        return frames, wave, rate, meta

    p = pipe()
    p.build()
    frames, wave, rate, meta = p.run()
    assert frames.at(0).shape == (8, 32, 32, 3) and wave.at(1).shape == (16000,)
    assert np.all(rate.as_array() == 16000)
    assert json.loads(bytes(meta.at(0)))["labels"]
    assert dali.__version__
