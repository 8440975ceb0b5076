"""fastmavil-prep: turns a folder of media files, or a CSV of them, into a dataset folder of shards.

    fastmavil-prep videos/ --out data/train                  # labels = class subfolders
    fastmavil-prep audioset.csv --out data/as2m --workers 16
    fastmavil-prep clips.csv --out data/eval --codec vp9 --clips-per-shard 100
    python -m fastmavil.data.prep ...                        # the same, without installing

Each clip becomes `KEY.mp4` (H.264, for GPU decoding; `--codec vp9` writes `KEY.webm`, which DALI
decodes on a CPU), `KEY.flac` (16 kHz mono) and `KEY.json` ({"labels", "duration", "source",
"start", "end", "video"} and "split"/"fold" from the CSV). The video is resized so its short
side is `--short-side` pixels, resampled to `--fps` (the frame on screen at each output time) and
has a keyframe every `--keyframe-interval` seconds, so a training window is a short seek away.
The clip lasts as long as its audio; media without a video stream give audio-only clips
("video": false); media without audio are failures, and so are video clips longer than
`--max-seconds` (120 by default: a worker holds a clip's frames until it encodes them; cut long
recordings into clips with CSV rows).

SRC a folder: every file with a media extension (mp4 mkv webm avi mov m4v flv wav flac mp3 ogg
m4a), recursively, in sorted order. A file in a subfolder is labelled with that subfolder's path
relative to SRC (`SRC/dog/x.mp4` -> "dog"); files directly in SRC have no labels.

SRC a .csv file: rows `path,labels[,start,end]`, an optional header row whose first cell is
`path` (with a header, the columns go by name: `split` and `fold` are kept too, others ignored).
Relative paths are relative to the CSV's folder. Labels are separated by `;`, or by `,` inside a
quoted cell when it holds no `;` (AudioSet's "/m/09x0r,/m/05zppz"); a label that contains a
comma needs `;` separators ("cattle, bovinae cowbell;"). Labels may be empty. start and end, in
seconds, trim the clip.

AudioSet CSVs (`YTID, start_seconds, end_seconds, "labels"`) of downloaded full videos named
`videos/YTID.mp4`:

    awk -F', ' '!/^#/ {print "videos/" $1 ".mp4," $4 "," $2 "," $3}' \\
        balanced_train_segments.csv > audioset.csv

or, for segments already cut and named `clips/YTID_START.wav`, without start and end:
`{print "clips/" $1 "_" int($2) ".wav," $4}`.

VGGSound's CSV (`YTID,start,label,split`) of downloaded 10 s clips named `clips/YTID_START.mp4`
(START zero-padded to 6 digits):

    python -c 'import csv, sys; w = csv.writer(sys.stdout); w.writerow(["path", "labels",
        "split"]); [w.writerow([f"clips/{y}_{int(s):06d}.mp4", l + ";", sp]) for y, s, l, sp
        in csv.reader(open("vggsound.csv"))]' > vggsound_prep.csv

ESC-50's `meta/esc50.csv` (`filename,fold,target,category,...`; the clips in `audio/`), keeping
the fold for cross-validation (configs/finetune/esc50.toml), run in the ESC-50 folder:

    python -c 'import csv, sys; w = csv.writer(sys.stdout); w.writerow(["path", "labels",
        "fold"]); [w.writerow(["audio/" + r["filename"], r["category"] + ";", r["fold"]])
        for r in csv.DictReader(open("meta/esc50.csv"))]' > esc50_prep.csv

Speech Commands v2 (a folder per word; `validation_list.txt` and `testing_list.txt` name the
other splits' clips), run in its folder: the word is the label, the split train, valid or test
(configs/finetune/spcv2.toml trains on train and scores test):

    python -c 'import csv, glob, sys; w = csv.writer(sys.stdout); s = {p: n for n, f in [(
        "valid", "validation_list.txt"), ("test", "testing_list.txt")] for p in open(f).read(
        ).split()}; w.writerow(["path", "labels", "split"]); [w.writerow([p, p.split("/")[0]
        + ";", s.get(p, "train")]) for p in sorted(glob.glob("*/*.wav")) if p[0] != "_"]' \\
        > spcv2_prep.csv

Keys come from file names: dots and slashes become `_` (webdataset and DALI take the extension
from the first dot), CSV rows with a start get `_START`, and a repeated name gets `_2`, `_3`, ...
in input order.

Shard size: a 10 s clip at 256p, 16 fps takes about 0.3-1 MB (FLAC ~0.2-0.3 MB, H.264 the rest,
depending on the content), so the default 1000 clips per shard makes shards of about 0.3-1 GB.
Keep that size for large sets, but give every loader consumer (GPUs x DataLoader workers) a shard
of its own, or every consumer reads every shard: clips per shard <= clips / consumers, e.g. at
most 312 for 20k clips on 8 GPUs x 8 workers.

Failures (unreadable files, no audio stream, an empty window) are listed in OUT/failures.csv and
do not stop the run. Rerunning the same command resumes: finished shards whose clips and
options are unchanged are kept, and the others are written again.
"""
from __future__ import annotations

import argparse
import csv
import functools
import math
import random
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .media import SAMPLE_RATE, VIDEO_CODECS, encode_flac, encode_video
from .writer import ClipFailure, interrupted, write_shards

MEDIA_EXTENSIONS = ("mp4", "mkv", "webm", "avi", "mov", "m4v", "flv", "wav", "flac", "mp3", "ogg",
                    "m4a")
CSV_COLUMNS = ("path", "labels", "start", "end")  # the positional columns of a CSV without header
# first cells of header rows that name the path column otherwise
OTHER_HEADERS = {"filename", "file_name", "file", "fname", "filepath", "file_path", "audio",
                 "video", "clip", "ytid", "# ytid", "youtube_id", "name"}
EXTRA_COLUMNS = ("split", "fold")                 # kept in the json when a header names them


class InputError(ValueError):
    """SRC cannot be turned into a list of clips."""


@dataclass
class Item:
    """One clip to make: the file to open and what its json says."""
    path: str
    source: str  # as given: found under SRC, or the CSV cell
    key: str
    labels: list[str] = field(default_factory=list)
    start: float | None = None
    end: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PrepOptions:
    codec: str = "h264"
    short_side: int = 256
    fps: float = 16.0
    keyframe_interval: float = 1.0  # seconds


def text(name: str) -> str:
    """A file system or CSV string as valid UTF-8: undecodable bytes become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def clip_key(name: str) -> str:
    """A key from a name: no dots (they start the extension), slashes or control characters."""
    return re.sub(r"[./\\\x00-\x1f]", "_", text(name)) or "clip"


def unique_keys(names: list[str]) -> list[str]:
    """Keys for `names` in order, `_2`, `_3`, ... appended to repeats."""
    seen, keys = set(), []
    for name in names:
        key, n = clip_key(name), 1
        while key in seen:
            n += 1
            key = f"{clip_key(name)}_{n}"
        seen.add(key)
        keys.append(key)
    return keys


def scan_folder(src: Path) -> list[Item]:
    files = sorted(p for p in src.rglob("*")
                   if p.suffix.lower().lstrip(".") in MEDIA_EXTENSIONS and p.is_file())
    items = []
    for path, key in zip(files, unique_keys([p.stem for p in files])):
        folder = path.parent.relative_to(src).as_posix()
        items.append(Item(str(path), str(path), key, [text(folder)] if folder != "." else []))
    return items


def parse_labels(cell: str) -> list[str]:
    sep = ";" if ";" in cell else ","
    return [text(label.strip()) for label in cell.split(sep) if label.strip()]


def _seconds(cell: str | None, where: str, column: str) -> float | None:
    if not cell:
        return None
    try:
        value = float(cell)
    except ValueError:
        raise InputError(f"{where}: {column} {cell!r} is not a number of seconds") from None
    if not 0 <= value < math.inf:
        raise InputError(f"{where}: {column} {cell!r} must be >= 0 and finite")
    return value


def read_csv(path: Path) -> list[Item]:
    """The rows of a CSV as items; raises InputError naming the line of a malformed row."""
    # surrogateescape: undecodable bytes in paths still name the files; utf-8-sig: Excel's BOM
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, skipinitialspace=True, strict=True)
        try:
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
        except csv.Error as err:
            raise InputError(f"{path}:{reader.line_num}: {err}") from None
    columns, hint = list(CSV_COLUMNS), ""
    if rows and rows[0][1][0].strip().lower() == "path":
        columns = [c.strip().lower() for c in rows.pop(0)[1]]
    elif rows:  # a first row that may be another header: ESC-50's "filename,fold,..."
        hint = " (read as data: a header row's first cell must be 'path')"
        first = rows[0][1][0].strip()
        if first.lower() in OTHER_HEADERS:  # it would parse as a clip, its labels a class
            raise InputError(f"{path}:{rows[0][0]}: the first row looks like a header "
                             f"({first!r}){hint}")
    parsed = []
    for i, (line, row) in enumerate(rows):
        where, row_hint = f"{path}:{line}", hint if i == 0 else ""
        if len(row) > len(columns):
            raise InputError(f"{where}: {len(row)} columns, expected at most {len(columns)} "
                             f"({','.join(columns)}){row_hint}")
        cells = dict(zip(columns, (c.strip() for c in row)))
        if not cells["path"]:
            raise InputError(f"{where}: empty path")
        try:
            start = _seconds(cells.get("start"), where, "start")
            end = _seconds(cells.get("end"), where, "end")
        except InputError as err:
            raise InputError(f"{err}{row_hint}") from None
        if end is not None and end <= (start or 0.0):
            raise InputError(f"{where}: end {end:g} must come after start {start or 0.0:g}")
        extra = {c: text(cells[c]) for c in EXTRA_COLUMNS if cells.get(c)}
        parsed.append((cells, start, end, extra))
    names = [Path(c["path"]).stem + (f"_{s:g}" if s is not None else "") for c, s, _, _ in parsed]
    return [Item(str(path.parent / cells["path"]), cells["path"], key,
                 parse_labels(cells.get("labels") or ""), start, end, extra)
            for (cells, start, end, extra), key in zip(parsed, unique_keys(names))]


def list_items(src: Path) -> list[Item]:
    if src.is_dir():
        items = scan_folder(src)
        if not items:
            raise InputError(f"{src}: no media files ({', '.join(MEDIA_EXTENSIONS)})")
        return items
    if not src.exists():
        raise InputError(f"{src}: no such folder or CSV file")
    if src.suffix.lower() != ".csv":
        raise InputError(f"{src}: SRC must be a folder of media files or a .csv file")
    items = read_csv(src)
    if not items:
        raise InputError(f"{src}: no rows")
    return items


def _reason(err: Exception) -> str:
    """A short reason: PyAV's errors carry the file name in str(), the cause in strerror."""
    return text(getattr(err, "strerror", None) or str(err) or type(err).__name__)


def output_size(width: float, height: float, short_side: int) -> tuple[int, int]:
    """(width, height) scaled so the short side is `short_side`, both rounded to even."""
    scale = short_side / min(width, height)
    return max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2))


class FrameSampler:
    """Resamples a video to `fps`: output frame k is the source frame on screen at
    origin + k / fps (the first source frame for times before it), as RGB of `size`."""

    def __init__(self, origin: float, fps: float, stop: float, size: tuple[int, int]):
        self.origin, self.fps, self.stop, self.size = origin, fps, stop, size
        self.frames: list[np.ndarray] = []
        self.shown = None  # the source frame on screen, converted only when output
        self.shown_rgb = None

    def _next_time(self) -> float:
        return self.origin + len(self.frames) / self.fps

    def _output_shown(self) -> None:
        if self.shown_rgb is None:
            width, height = self.size
            # AREA: no aliasing when shrinking, and 5x faster than swscale's default here
            self.shown_rgb = self.shown.to_ndarray(format="rgb24", width=width, height=height,
                                                   interpolation="AREA")
        self.frames.append(self.shown_rgb)

    def add(self, frame, time: float) -> None:
        if self.shown is None:
            self.shown = frame
        while self._next_time() < min(time - 1e-6, self.stop):  # a tie shows the new frame
            self._output_shown()
        self.shown, self.shown_rgb = frame, None

    def finish(self, count: int) -> np.ndarray:
        """The first `count` output frames; the last source frame holds after the video ends."""
        while len(self.frames) < count:
            self._output_shown()
        return np.stack(self.frames[:count])


def _decode(container, item: Item, options: PrepOptions,
            max_seconds: float = 0.0) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(16 kHz mono waveform, RGB frames or None, start time) of the clip's window; a video
    window longer than `max_seconds` (> 0) fails as soon as decoding passes it: its frames are
    held in memory until encoded (~6 MB a second at 256p, 16 fps)."""
    import av

    if not container.streams.audio:
        raise ClipFailure("no audio stream")
    audio = container.streams.audio[0]
    # cover art in mp3/m4a files is a one-frame video stream: not a video
    videos = [s for s in container.streams.video
              if not s.disposition & av.stream.Disposition.attached_pic]
    video = videos[0] if videos else None
    origin = item.start if item.start is not None else (container.start_time or 0) / 1e6
    stop = item.end if item.end is not None else math.inf
    if item.start:
        container.seek(int(item.start * 1e6))  # to the keyframe before; earlier frames dropped
    # keeps the channels, averaged below: swresample's mono downmix adds +3 dB and clips stereo
    resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)
    chunks, audio_start, audio_time = [], None, 0.0
    sampler = None
    streams, done = [audio] + ([video] if video else []), set()
    for frame in container.decode(*streams):  # in presentation order per stream
        if (max_seconds and video is not None  # audio alone is light: no limit
                and frame.time is not None and origin + max_seconds < frame.time < stop):
            raise ClipFailure(f"longer than --max-seconds {max_seconds:g}: cut it into clips "
                              "with CSV rows (path,labels,start,end), or raise the limit (a "
                              "rerun into the same --out keeps finished shards: remove their "
                              "shard-N.tar to redo them)")
        if isinstance(frame, av.AudioFrame):
            time = frame.time if frame.time is not None else audio_time
            audio_time = time + frame.samples / frame.sample_rate
            if time >= stop:
                done.add("audio")
            elif audio_time > origin:
                audio_start = time if audio_start is None else audio_start
                chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(frame)]
        elif frame.time is not None:
            if frame.time >= stop:
                done.add("video")
                continue
            if sampler is None:
                sar = float(video.sample_aspect_ratio or 1)  # non-square pixels: display size
                size = output_size(frame.width * sar, frame.height, options.short_side)
                sampler = FrameSampler(origin, options.fps, stop, size)
            sampler.add(frame, frame.time)
        if len(done) == len(streams):
            break
    if audio_start is None:
        raise ClipFailure("no audio in the window")
    chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(None)]  # flush
    wave = np.concatenate(chunks)
    # the first decoded sample lies at audio_start: cut to origin, or pad if audio starts later
    offset = round((origin - audio_start) * SAMPLE_RATE)
    wave = wave[offset:] if offset >= 0 else np.concatenate([np.zeros(-offset, wave.dtype), wave])
    if stop < math.inf:
        wave = wave[:round((stop - origin) * SAMPLE_RATE)]
    if len(wave) == 0:
        raise ClipFailure("no audio in the window")
    if video is None:
        return wave, None, origin
    if sampler is None:
        raise ClipFailure("no video frames in the window")
    # as long as the audio: every audio instant has its frame
    count = max(1, math.ceil(len(wave) / SAMPLE_RATE * options.fps - 1e-6))
    return wave, sampler.finish(count), origin


def make_clip(options: PrepOptions, item: Item, max_seconds: float = 0.0) -> tuple[str, dict]:
    """One item -> (key, members); raises ClipFailure with a short reason (a window longer
    than `max_seconds`, > 0, among them)."""
    import av

    try:
        container = av.open(item.path)
    except Exception as err:  # PyAV raises many types: not found, invalid data, ...
        raise ClipFailure(f"cannot open: {_reason(err)}") from None
    with container:
        try:
            wave, frames, origin = _decode(container, item, options, max_seconds)
        except ClipFailure:
            raise
        except Exception as err:
            raise ClipFailure(f"cannot decode: {_reason(err)}") from None
    duration = len(wave) / SAMPLE_RATE
    meta = {"labels": item.labels, "duration": duration, "source": text(item.source),
            "start": round(origin, 6), "end": round(origin + duration, 6),
            "video": frames is not None, **item.extra}
    members = {"flac": encode_flac(wave), "json": meta}
    if frames is not None:
        gop = max(1, round(options.keyframe_interval * options.fps))  # encode_video counts frames
        ext = VIDEO_CODECS[options.codec][1]
        members[ext] = encode_video(frames, options.fps, options.codec, keyframe_interval=gop)
    return item.key, members


def describe(item: Item) -> str:
    return text(item.source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastmavil-prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a folder of media files (class subfolders) or a .csv file")
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--clips-per-shard", type=int, default=1000,
                        help="default 1000: ~0.3-1 GB of 10 s 256p clips")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    parser.add_argument("--codec", choices=list(VIDEO_CODECS), default="h264",
                        help="h264 (mp4, GPU decoding; default) or vp9 (webm, DALI on a CPU)")
    parser.add_argument("--short-side", type=int, default=256, help="pixels, even (default 256)")
    parser.add_argument("--fps", type=float, default=16.0, help="frame rate (default 16)")
    parser.add_argument("--keyframe-interval", type=float, default=1.0,
                        help="seconds between keyframes (default 1)")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="longest video clip (default 120; 0: no limit): a worker holds a "
                             "clip's frames until it is encoded, ~6 MB a second at 256p and "
                             "16 fps; cut longer recordings into clips with CSV rows")
    args = parser.parse_args(argv)
    if args.short_side < 2 or args.short_side % 2:
        parser.error(f"--short-side {args.short_side} must be even and >= 2")
    if args.fps <= 0 or args.keyframe_interval <= 0:
        parser.error("--fps and --keyframe-interval must be > 0")
    if args.clips_per_shard < 1 or args.workers < 0 or args.max_seconds < 0:
        parser.error("--clips-per-shard must be >= 1, --workers and --max-seconds >= 0")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    try:
        items = list_items(Path(args.src))
    except InputError as err:
        print(f"fastmavil-prep: error: {err}", file=sys.stderr)
        return 2
    # Dealt to shards in a fixed random order: a folder sorted by class (or a CSV sorted by
    # label) would give single-class shards, and the loader's shuffle buffer mixes only the few
    # shards a worker is reading. Fixed, so that a rerun resumes the same shards.
    random.Random(0).shuffle(items)
    options = PrepOptions(args.codec, args.short_side, args.fps, args.keyframe_interval)
    labels = sorted({label for item in items for label in item.labels})
    # max_seconds stays out of the shards' fingerprint: it chooses what fails, not how clips
    # are written, so a rerun with another limit keeps the finished shards
    make = functools.partial(make_clip, options, max_seconds=args.max_seconds)
    try:
        index = write_shards(args.out, items, make, describe, labels,
                             args.clips_per_shard, args.workers, title="prep",
                             # SRC as a path: "videos/" and "videos" write the same shards
                             prep={"src": text(str(Path(args.src))), **asdict(options)})
    except KeyboardInterrupt:
        return interrupted("fastmavil-prep")
    out = Path(args.out)
    failed = f" (see {out / 'failures.csv'})" if index["failed"] else ""
    print(f"{out}: {index['clips']} clips in {len(index['shards'])} shard(s), "
          f"{index['failed']} failed{failed}")
    return 0 if index["clips"] else 1  # every clip failed: nothing to train on


if __name__ == "__main__":
    sys.exit(main())
