"""fastmavil-prep on media generated here: folders, CSVs, failures, keys, resume, workers."""
import csv
import io
import json
import os
from pathlib import Path

import av  # required dependencies: a broken install must fail here, not skip
import numpy as np
import pytest
import soundfile as sf

from fastmavil.data.prep import main, read_csv, unique_keys
from fastmavil.data.shards import read_index, read_shard

RATE = 44100
BITS = 6  # of the frame number drawn into test videos


def tone(seconds: float, rate: int = RATE) -> np.ndarray:
    """(2, samples) stereo float32: the same 440 Hz tone at 0.5 in both channels."""
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * 440 * t)] * 2).astype(np.float32)


def write_video(path: Path, seconds: float, audio: str | None = "aac", video: str = "mpeg4",
                fps: int = 10, size: tuple[int, int] = (64, 48)) -> Path:
    """A video whose frame i shows i in binary (see `frame_numbers`), with a 44.1 kHz stereo
    tone (`audio` codec)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:  # all streams before the first packet
        v = out.add_stream(video, rate=fps)
        v.width, v.height, v.pix_fmt = *size, "yuv420p"
        a = out.add_stream(audio, rate=RATE, layout="stereo") if audio else None
        for i in range(int(seconds * fps)):
            bits = (i >> (np.arange(size[0]) * BITS // size[0])) & 1  # the band of each column
            image = np.broadcast_to(255 * bits[None, :, None], (size[1], size[0], 3))
            image = np.ascontiguousarray(image, np.uint8)
            out.mux(v.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(v.encode())
        if a is not None:
            wave, block = tone(seconds), 1024
            for s in range(0, wave.shape[1], block):
                chunk = wave[:, s:s + block]
                if a.codec_context.format.name == "fltp":
                    frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
                else:
                    frame = av.AudioFrame.from_ndarray((chunk * 32767).astype(np.int16),
                                                       format="s16p", layout="stereo")
                frame.sample_rate, frame.pts = RATE, s
                out.mux(a.encode(frame))
            out.mux(a.encode())
    return path


def write_wav(path: Path, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # soundfile cannot open names with undecodable bytes
        sf.write(f, tone(seconds).T, RATE, format="WAV")
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """src/{broken.mp4, cat/clip.mkv, cat/silent.mp4, cat/sound.wav, cat/x?.wav (bad byte),
    dog/a.b.mp4, dog/clip.mkv, dog/été.wav, notes.txt}."""
    src = tmp_path_factory.mktemp("media") / "src"
    write_video(src / "dog" / "a.b.mp4", 2.0, "aac", "libx264")
    write_video(src / "dog" / "clip.mkv", 1.5, "flac")
    write_video(src / "cat" / "clip.mkv", 1.0, "flac")
    write_video(src / "cat" / "silent.mp4", 1.0, audio=None)
    write_wav(src / "cat" / "sound.wav", 1.0)
    write_wav(Path(os.fsdecode(bytes(src / "cat") + b"/x\xff.wav")), 0.5)
    write_wav(src / "dog" / "été.wav", 0.5)
    (src / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (src / "notes.txt").write_text("not media")
    return src


def load(out: Path) -> dict:
    """key -> members of every clip in the dataset folder."""
    return {clip.key: clip.members for shard in sorted(out.glob("shard-*.tar"))
            for clip in read_shard(shard)}


def video_info(data: bytes) -> tuple[int, int, int, list[float]]:
    """(width, height, frames, keyframe times) of an encoded video."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size]  # the last one flushes
    keys = sorted(float(p.pts * p.time_base) for p in packets if p.is_keyframe)
    return stream.width, stream.height, len(packets), keys


def failures(out: Path) -> dict[str, str]:
    with open(out / "failures.csv", newline="") as f:
        return {row["source"]: row["reason"] for row in csv.DictReader(f)}


def test_folder(media, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(media), "--out", str(out), "--workers", "1", "--short-side", "64",
                 "--fps", "10"]) == 0
    index = read_index(out)
    assert index["labels"] == ["cat", "dog"]
    assert index["clips"] == 6 and index["failed"] == 2
    clips = load(out)
    assert set(clips) == {"a_b", "clip", "clip_2", "sound", "x\ufffd", "été"}
    lengths = {"a_b": 2.0, "clip": 1.0, "clip_2": 1.5, "sound": 1.0, "x\ufffd": 0.5, "été": 0.5}
    for key, members in clips.items():
        meta = json.loads(members["json"])
        assert meta["labels"] == (["dog"] if key in ("a_b", "clip_2", "été") else ["cat"])
        wave, rate = sf.read(io.BytesIO(members["flac"]), always_2d=True)
        assert rate == 16000 and wave.shape[1] == 1
        assert len(wave) / rate == pytest.approx(meta["duration"], abs=1e-4)
        assert meta["duration"] == pytest.approx(lengths[key], abs=1 / 16)
        # averaged, not summed: the 0.5 tone in both channels stays at 0.5
        assert np.abs(wave).max() == pytest.approx(0.5, abs=0.03)
        has_video = key not in ("sound", "x\ufffd", "été")
        assert meta["video"] is has_video
        assert set(members) == ({"flac", "json", "mp4"} if has_video else {"flac", "json"})
        if has_video:
            width, height, frames, _ = video_info(members["mp4"])
            assert (width, height) == (86, 64)  # 64x48 scaled to short side 64, even
            assert abs(frames - 10 * meta["duration"]) <= 1
    reasons = failures(out)
    assert set(reasons) == {str(media / "broken.mp4"), str(media / "cat" / "silent.mp4")}
    assert reasons[str(media / "cat" / "silent.mp4")] == "no audio stream"
    assert reasons[str(media / "broken.mp4")].startswith("cannot open")
    assert f"{out}: 6 clips in 1 shard(s), 2 failed" in capsys.readouterr().out


def test_sorted_classes_are_dealt_across_shards(tmp_path):
    """A folder sorted by class does not become single-class shards (the loader's buffer mixes
    only the few shards a worker reads)."""
    src = tmp_path / "src"
    for label in ("a", "b"):
        for i in range(4):
            write_wav(src / label / f"{label}{i}.wav", 0.2)
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--workers", "1", "--clips-per-shard", "2"]) == 0
    shards = [{json.loads(c.members["json"])["labels"][0] for c in read_shard(path)}
              for path in sorted(out.glob("shard-*.tar"))]
    assert len(shards) == 4 and any(len(classes) == 2 for classes in shards)


def frame_numbers(data: bytes) -> list[int]:
    """The source frame number each frame shows: bit j is white in band j of BITS vertical bands,
    read at the band's centre, robust to resizing and lossy coding."""
    numbers = []
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24")
            centres = ((np.arange(BITS) + 0.5) * rgb.shape[1] / BITS).astype(int)
            numbers.append(int(sum((rgb[:, centres].mean(axis=(0, 2)) > 128) << np.arange(BITS))))
    return numbers


def test_frames_follow_the_source(media, tmp_path):
    """Output frame k at 16 fps shows the source frame on screen at k / 16 s: floor(10 k / 16)."""
    out = tmp_path / "out"
    main([str(media / "dog"), "--out", str(out), "--workers", "1", "--short-side", "48"])
    assert frame_numbers(load(out)["clip"]["mp4"]) == [10 * k // 16 for k in range(24)]


@pytest.mark.parametrize("codec, ext", [("vp9", "webm"), ("h264", "mp4")])
def test_keyframes(tmp_path, codec, ext):
    write_video(tmp_path / "src" / "long.mkv", 3.0, "flac")
    out = tmp_path / "out"
    main([str(tmp_path / "src"), "--out", str(out), "--workers", "1", "--codec", codec,
          "--short-side", "32", "--keyframe-interval", "0.5"])
    members = load(out)["long"]
    assert set(members) == {"flac", "json", ext}
    width, height, frames, keys = video_info(members[ext])
    assert (width, height, frames) == (42, 32, 48)
    assert keys[0] == 0 and np.diff(keys + [3.0]).max() <= 0.5 + 1e-6


def test_csv(media, tmp_path):
    """A header with a split column, paths relative to the CSV's folder or absolute, trimming."""
    rel = os.path.relpath(media, tmp_path)
    rows = ["path,labels,start,end,split",
            f'{rel}/dog/a.b.mp4,"/m/09x0r,/m/05zppz",0.5,1.75,train',
            f"{rel}/cat/sound.wav,,,,test",
            f"{media / 'dog' / 'clip.mkv'},speech;music,1,,",
            "missing.mp4,speech,,,"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main([str(tmp_path / "list.csv"), "--out", str(out), "--workers", "1",
                 "--short-side", "32", "--fps", "8"]) == 0
    index = read_index(out)
    assert index["labels"] == ["/m/05zppz", "/m/09x0r", "music", "speech"]
    clips = load(out)
    assert set(clips) == {"a_b_0_5", "sound", "clip_1"}
    meta = json.loads(clips["a_b_0_5"]["json"])
    assert meta["labels"] == ["/m/09x0r", "/m/05zppz"] and meta["split"] == "train"
    assert meta["source"] == f"{rel}/dog/a.b.mp4"
    assert (meta["start"], meta["end"]) == pytest.approx((0.5, 1.75), abs=1e-3)
    assert meta["duration"] == pytest.approx(1.25, abs=1e-3)
    # 1.25 s at 8 fps from 0.5 s: frame k shows source frame floor(10 (0.5 + k / 8))
    assert frame_numbers(clips["a_b_0_5"]["mp4"]) == [int(10 * (0.5 + k / 8)) for k in range(10)]
    sound = json.loads(clips["sound"]["json"])
    assert sound["labels"] == [] and sound["split"] == "test"
    assert sound["duration"] == pytest.approx(1.0, abs=1e-3)
    clip = json.loads(clips["clip_1"]["json"])  # start 1 to the end of the 1.5 s video
    assert clip["duration"] == pytest.approx(0.5, abs=1 / 16) and "split" not in clip
    assert failures(out) == {"missing.mp4": "cannot open: No such file or directory"}


def test_csv_parsing(tmp_path):
    """No header: positional columns; AudioSet-style spaces and quoted comma labels."""
    table = tmp_path / "t.csv"
    table.write_text('YT1, "/m/a,/m/b", 30.000, 40.000\n'
                     'a.b.mp4,speech\n'
                     '\n'
                     'x/a.b.mp4,"cattle, bovinae cowbell;",2.5\n'
                     '/abs/c.wav\n')
    items = read_csv(table)
    assert [i.key for i in items] == ["YT1_30", "a_b", "a_b_2_5", "c"]
    assert items[0].labels == ["/m/a", "/m/b"] and (items[0].start, items[0].end) == (30, 40)
    assert items[1].labels == ["speech"] and items[1].start is None
    assert items[2].labels == ["cattle, bovinae cowbell"] and items[2].start == 2.5
    assert items[2].path == str(tmp_path / "x" / "a.b.mp4") and items[2].source == "x/a.b.mp4"
    assert items[3].labels == [] and items[3].path == "/abs/c.wav"


def test_keys_unique_and_dot_free():
    assert unique_keys(["a.b", "a.b", "a_b", "a/b", "c\udcff", ""]) == \
        ["a_b", "a_b_2", "a_b_3", "a_b_4", "c\ufffd", "clip"]


def test_resume_and_workers(media, tmp_path):
    # vp9: its bytes are a function of the frames; x264's are not always (fastmavil.data.media)
    args = ["--clips-per-shard", "2", "--short-side", "32", "--fps", "8", "--codec", "vp9"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([str(media), "--out", str(one), "--workers", "1", *args]) == 0
    assert main([str(media), "--out", str(two), "--workers", "2", *args]) == 0
    shards = sorted(one.glob("shard-*.tar"))
    assert [s.name for s in shards] == [f"shard-00000{i}.tar" for i in range(4)]
    # same bytes from 1 or 2 workers: clips, order and shards do not depend on the workers
    assert [s.read_bytes() for s in shards] == [(two / s.name).read_bytes() for s in shards]
    stamps = [s.stat().st_mtime_ns for s in shards]
    expected = read_index(one)
    shards[1].unlink()
    # SRC spelled with a trailing slash names the same folder: the other shards are kept
    assert main([f"{media}/", "--out", str(one), "--workers", "1", *args]) == 0
    assert read_index(one) == expected
    assert shards[1].read_bytes() == (two / shards[1].name).read_bytes()  # redone
    assert [s.stat().st_mtime_ns for s in shards[:1] + shards[2:]] == stamps[:1] + stamps[2:]
    assert set(failures(one)) == {str(media / "broken.mp4"), str(media / "cat" / "silent.mp4")}


@pytest.mark.parametrize("src, message", [
    ("missing", "missing: no such folder or CSV file"),
    ("empty", "empty: no media files"),
    ("x.mp4", "must be a folder of media files or a .csv file"),
    ("bad.csv", "bad.csv:3: start 'abc' is not a number"),
    ("wide.csv", "wide.csv:1: 5 columns, expected at most 4"),
    ("order.csv", "order.csv:2: end 1 must come after start 2"),
    ("quote.csv", "quote.csv:1: ',' expected after '\"'"),
    ("header.csv", "header.csv: no rows"),
    # another dataset's header, read as data, says what a header needs
    ("esc50.csv", "esc50.csv:1: the first row looks like a header ('filename') (read as data: "
                  "a header row's first cell must be 'path')"),
    ("wider.csv", "wider.csv:1: 7 columns, expected at most 4 (path,labels,start,end) (read as "
                  "data: a header row's first cell must be 'path')"),
    ("named.csv", "named.csv:1: start 'split' is not a number of seconds (read as data: a "
                  "header row's first cell must be 'path')"),
    ("two.csv", "two.csv:1: the first row looks like a header ('filename') (read as data: a "
                "header row's first cell must be 'path')"),  # else a clip, and a class
])
def test_bad_inputs(tmp_path, capsys, src, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not media")
    (tmp_path / "x.mp4").write_bytes(b"")
    (tmp_path / "bad.csv").write_text("path,labels,start\na.wav,x,1\nb.wav,y,abc\n")
    (tmp_path / "wide.csv").write_text("a.wav,x,1,2,3\n")
    (tmp_path / "order.csv").write_text("a.wav,x,0,1\nb.wav,x,2,1\n")
    (tmp_path / "quote.csv").write_text('a.wav,"x"y\n')
    (tmp_path / "header.csv").write_text("path,labels\n")
    (tmp_path / "esc50.csv").write_text("filename,fold,target,category,esc10,src_file,take\n"
                                        "1-1-A-0.wav,1,0,dog,True,1,A\n")
    (tmp_path / "named.csv").write_text("my file,labels,split\na.wav,dog,train\n")
    (tmp_path / "two.csv").write_text("filename,category\na.wav,dog\n")
    (tmp_path / "wider.csv").write_text("sound,fold,target,category,esc10,src_file,take\n"
                                        "1-1-A-0.wav,1,0,dog,True,1,A\n")
    assert main([str(tmp_path / src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmavil-prep: error: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("option", [["--short-side", "255"], ["--fps", "0"], ["--codec", "av1"],
                                    ["--clips-per-shard", "0"], ["--max-seconds", "-1"]])
def test_bad_options(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--out", str(tmp_path / "out"), *option])
    assert exit_info.value.code == 2
    assert option[0] in capsys.readouterr().err


def test_an_output_path_that_is_a_file_and_a_run_where_every_clip_fails(tmp_path, capsys):
    (tmp_path / "src" / "dog").mkdir(parents=True)
    (tmp_path / "src" / "dog" / "a.wav").write_bytes(b"not audio")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "src"), "--out", str(tmp_path / "file")])
    assert exit_info.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert main([str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 1
    assert ": 0 clips in 1 shard(s), 1 failed" in capsys.readouterr().out


def test_a_clip_longer_than_max_seconds_fails_before_it_fills_memory(tmp_path, capsys):
    """A worker holds a clip's frames until it encodes them: a long recording fails with the
    way out named; a CSV window of it within the limit, or no limit, goes through."""
    long = write_video(tmp_path / "src" / "dog" / "long.mp4", 3.0)
    write_wav(tmp_path / "src" / "dog" / "sound.wav", 3.0)  # audio alone is light: kept
    args = ["--workers", "1", "--short-side", "32", "--fps", "8", "--max-seconds", "2"]
    assert main([str(tmp_path / "src"), "--out", str(tmp_path / "a"), *args]) == 0
    failures = (tmp_path / "a" / "failures.csv").read_text()
    assert "longer than --max-seconds 2: cut it into clips with CSV rows" in failures
    assert set(load(tmp_path / "a")) == {"sound"}
    (tmp_path / "list.csv").write_text(f"path,labels,start,end\n{long},dog,0.5,2.0\n")
    assert main([str(tmp_path / "list.csv"), "--out", str(tmp_path / "b"), *args]) == 0
    assert main([str(tmp_path / "src"), "--out", str(tmp_path / "c"), *args[:-1], "0"]) == 0
    assert json.loads(load(tmp_path / "c")["long"]["json"])["duration"] > 2.9
