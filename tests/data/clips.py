"""Clips and shards for the loader tests: generated, small, bad ones included."""
import io
import tarfile

import numpy as np

from fastmavil.data.loader import LoaderSpec
from fastmavil.data.media import encode_flac, encode_video
from fastmavil.data.shards import ShardWriter
from fastmavil.data.synth import SynthSpec, make_clip

SPEC = LoaderSpec(audio_frames=128, mel_bins=64, video_frames=4, video_size=32,
                  video_seconds=1.0, shuffle_buffer=4)
SYNTH = SynthSpec(seconds=1.0, size=48, fps=8.0)


def good(index):
    return make_clip(index, SYNTH, "train")


def flac(seconds, rate=16000, channels=1):
    wave = 0.3 * np.sin(np.arange(int(seconds * rate)) / 7.0)
    return encode_flac(np.stack([wave] * channels, 1) if channels > 1 else wave, rate)


def raw_tar(path, members):
    """A tar with exactly these (name, bytes) members; names may be non-UTF-8 (surrogates)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def bad_clips_shard(folder):
    """A shard of a good clip and one of each kind of bad clip the loaders repair or skip."""
    import soundfile

    _, ok = good(0)
    video, meta = ok["webm"], b'{"labels": [], "duration": 1.0}'
    long_video = make_clip(0, SynthSpec(seconds=3.0, size=48, fps=8.0), "train")[1]["webm"]
    short = encode_video(np.full((2, 48, 48, 3), 90, np.uint8), 8.0)
    empty_audio = io.BytesIO()
    soundfile.write(empty_audio, np.zeros(0), 16000, format="FLAC")
    clips = {
        "good": [("webm", video), ("flac", ok["flac"]), ("json", meta)],
        "truncated_video": [("webm", long_video[: int(len(long_video) * 0.7)]),
                            ("flac", ok["flac"]), ("json", b'{"duration": 3.0}')],
        "corrupt_video": [("webm", b"\x1a\x45" + bytes(300)), ("flac", ok["flac"]),
                          ("json", meta)],
        "corrupt_audio": [("webm", video), ("flac", b"fLaC" + bytes(100)), ("json", meta)],
        "missing_audio": [("webm", video), ("json", meta)],
        "missing_json": [("webm", video), ("flac", ok["flac"])],
        "empty_audio": [("webm", video), ("flac", empty_audio.getvalue()), ("json", meta)],
        "tiny_audio": [("webm", video), ("flac", flac(0.01)), ("json", meta)],
        "short": [("webm", short), ("flac", flac(0.3)), ("json", b'{"duration": 0.25}')],
        "stereo_44k": [("webm", video), ("flac", flac(1.0, 44100, 2)), ("json", meta)],
        "wrong_duration": [("webm", video), ("flac", ok["flac"]), ("json", b'{"duration": 9}')],
        "caf\udce9": [("webm", video), ("flac", ok["flac"]), ("json", meta)],  # latin-1 byte
    }
    raw_tar(folder / "shard-000000.tar",
            [(f"{key}.{ext}", data) for key, members in clips.items() for ext, data in members])
    return folder


def write_dataset(folder, clips, per_shard):
    from fastmavil.data.shards import shard_name, write_index
    from fastmavil.data.synth import class_names
    shards = []
    for s in range(0, clips, per_shard):
        path = folder / shard_name(s // per_shard)
        with ShardWriter(path) as writer:
            for i in range(s, min(s + per_shard, clips)):
                writer.add(*good(i))
        shards.append({"name": path.name, "clips": writer.clips, "bytes": path.stat().st_size})
    write_index(folder, shards, class_names(SYNTH.classes))


