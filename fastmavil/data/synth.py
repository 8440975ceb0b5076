"""fastmavil-synth: a labelled audio-visual dataset of real encoded clips, from a seed.

Each of K classes ties a sound to a visual: e.g. `chirp_up-blue-triangle-up_down` is a rising chirp
heard while a blue triangle moves up and down. Per clip, the pitch, the event's onset and length,
the object's position, size and speed, the noise levels and distractors (a grey shape that moves
throughout, a quiet tone of another kind) are random. Sound and object appear together, so audio and
video are correlated in time as well as by class; the classes are learnable but not trivial. Clips
go through the same shard writer as fastmavil-prep, into `OUT/train/` and `OUT/heldout/`, each a
dataset folder with its index.json.

    fastmavil-synth --out data/synth --clips 300
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .media import SAMPLE_RATE, VIDEO_CODECS, encode_flac, encode_video
from .shards import read_index
from .writer import interrupted, write_shards

SOUNDS = ("tone", "chord", "chirp_up", "chirp_down", "noise_band", "clicks", "tremolo",
          "vibrato", "square", "beeps")
SHAPES = ("circle", "square", "triangle", "ring", "cross")
COLOURS = {"red": (230, 40, 40), "green": (40, 210, 60), "blue": (50, 90, 240),
           "yellow": (235, 220, 40), "magenta": (220, 50, 210), "cyan": (40, 220, 220),
           "orange": (250, 140, 20), "white": (240, 240, 240)}
MOTIONS = ("left_right", "up_down", "circling", "pulsing", "diagonal")


def class_names(num_classes: int) -> list[str]:
    """Class c pairs sound c with a (colour, shape, motion) combination; all names distinct."""
    colours = list(COLOURS)
    names = []
    for c in range(num_classes):
        sound = SOUNDS[c % len(SOUNDS)]
        shape = SHAPES[c % len(SHAPES)]
        colour = colours[(c + c // len(SOUNDS)) % len(colours)]
        motion = MOTIONS[(c // 2 + c // len(SOUNDS)) % len(MOTIONS)]
        names.append(f"{sound}-{colour}-{shape}-{motion}")
    if len(set(names)) != num_classes:
        raise ValueError(f"--classes {num_classes}: at most {len(set(names))} distinct classes")
    return names


@dataclass(frozen=True)
class SynthSpec:
    seed: int = 0
    classes: int = 10
    seconds: float = 4.0
    size: int = 96         # frame height and width
    fps: float = 8.0
    codec: str = "vp9"


def _sound(kind: str, f0: float, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    two_pi = 2 * np.pi
    if kind == "tone":
        return np.sin(two_pi * f0 * t) + 0.3 * np.sin(two_pi * 2 * f0 * t)
    if kind == "chord":
        return sum(np.sin(two_pi * f0 * r * t) for r in (1.0, 1.25, 1.5)) / 2
    if kind in ("chirp_up", "chirp_down"):
        lo, hi = (f0, 3 * f0) if kind == "chirp_up" else (3 * f0, f0)
        span = max(t[-1] - t[0], 1e-3)
        freq = lo * (hi / lo) ** ((t - t[0]) / span)          # exponential sweep
        return np.sin(two_pi * np.cumsum(freq) / SAMPLE_RATE)
    if kind == "noise_band":
        spectrum = np.fft.rfft(rng.standard_normal(len(t)))
        freqs = np.fft.rfftfreq(len(t), 1 / SAMPLE_RATE)
        spectrum[np.abs(freqs - f0) > f0 / 4] = 0
        band = np.fft.irfft(spectrum, len(t))
        return band / (np.abs(band).max() + 1e-9)
    if kind == "clicks":
        rate = rng.uniform(4, 10)
        phase = (t * rate) % 1.0
        return rng.standard_normal(len(t)) * np.exp(-phase / rate / 0.004)
    if kind == "tremolo":
        return np.sin(two_pi * f0 * t) * (0.5 + 0.5 * np.sin(two_pi * 6 * t))
    if kind == "vibrato":
        return np.sin(two_pi * f0 * t + 6 * np.sin(two_pi * 5 * t))
    if kind == "square":
        return 0.6 * np.sign(np.sin(two_pi * f0 * t))
    if kind == "beeps":
        return np.sin(two_pi * f0 * t) * (np.sin(two_pi * 3 * t) > 0)
    raise ValueError(f"unknown sound {kind!r}")


def _shape_mask(shape: str, xx, yy, cx, cy, r) -> np.ndarray:
    """(T, H, W) mask of a shape centred at (cx, cy) (T,) with radius r (T,)."""
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    r = r[:, None, None]
    if shape == "circle":
        return dx ** 2 + dy ** 2 < r ** 2
    if shape == "square":
        return (np.abs(dx) < 0.8 * r) & (np.abs(dy) < 0.8 * r)
    if shape == "triangle":
        return (dy < r * 0.8) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.6)
    if shape == "ring":
        d2 = dx ** 2 + dy ** 2
        return (d2 < r ** 2) & (d2 > (0.55 * r) ** 2)
    if shape == "cross":
        return ((np.abs(dx) < 0.3 * r) & (np.abs(dy) < r)) | ((np.abs(dy) < 0.3 * r)
                                                               & (np.abs(dx) < r))
    raise ValueError(f"unknown shape {shape!r}")


def _path(motion: str, u: np.ndarray, rng: np.random.Generator, size: int):
    """Object centre (T,) x, y and radius for progress u in [0, 1] over the event."""
    r0 = size * rng.uniform(0.1, 0.17)
    x0, y0 = rng.uniform(0.3, 0.7, size=2) * size
    amp = size * rng.uniform(0.15, 0.25)
    speed = rng.uniform(0.7, 1.5) * 2 * np.pi
    wave = np.sin(speed * u + rng.uniform(0, 2 * np.pi))
    r = np.full_like(u, r0)
    x, y = np.full_like(u, x0), np.full_like(u, y0)
    if motion == "left_right":
        x = x0 + amp * wave
    elif motion == "up_down":
        y = y0 + amp * wave
    elif motion == "circling":
        x, y = x0 + amp * np.cos(speed * u), y0 + amp * np.sin(speed * u)
    elif motion == "pulsing":
        r = r0 * (1 + 0.4 * wave)
    elif motion == "diagonal":
        x, y = x0 + amp * wave, y0 + amp * wave
    return x, y, r


def make_clip(index: int, spec: SynthSpec, split: str) -> tuple[str, dict]:
    """Clip `index` of the dataset: deterministic from (seed, index)."""
    rng = np.random.default_rng([spec.seed, index])
    names = class_names(spec.classes)
    label = int(rng.integers(spec.classes))
    sound, colour, shape, motion = names[label].split("-")
    n_samples = int(spec.seconds * SAMPLE_RATE)
    n_frames = int(round(spec.seconds * spec.fps))
    onset = rng.uniform(0.0, 0.4) * spec.seconds
    length = rng.uniform(0.35, 0.6) * spec.seconds
    offset = min(onset + length, spec.seconds)

    # audio: the class sound during the event, a quiet distractor tone, background noise
    t = np.arange(n_samples) / SAMPLE_RATE
    f0 = 2 ** rng.uniform(np.log2(250), np.log2(1200))  # pitch: log-uniform per clip
    active = (t >= onset) & (t < offset)
    wave = np.zeros(n_samples)
    ramp = np.minimum(1.0, np.minimum(t[active] - onset, offset - t[active]) / 0.02)
    wave[active] = _sound(sound, f0, t[active], rng) * ramp * rng.uniform(0.3, 0.6)
    if rng.random() < 0.5:
        kind = SOUNDS[(SOUNDS.index(sound) + rng.integers(1, len(SOUNDS))) % len(SOUNDS)]
        wave += 0.08 * _sound(kind, 2 ** rng.uniform(7, 11), t, rng)
    wave += rng.uniform(0.005, 0.05) * rng.standard_normal(n_samples)

    # video: the class object while the sound plays, a grey distractor, noisy background
    size = spec.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    times = np.arange(n_frames) / spec.fps
    base = rng.uniform(10, 60, size=3)
    frames = np.empty((n_frames, size, size, 3), np.float32)
    frames[:] = base + 30 * (yy / size)[..., None]
    shown = (times >= onset) & (times < offset)
    if shown.any():
        u = (times[shown] - onset) / max(length, 1e-3)
        cx, cy, r = _path(motion, u, rng, size)
        mask = _shape_mask(shape, xx, yy, cx, cy, r)
        tint = np.array(COLOURS[colour]) * rng.uniform(0.75, 1.0)
        frames[shown] = np.where(mask[..., None], tint, frames[shown])
    if rng.random() < 0.6:
        cx, cy, r = _path("diagonal", times / spec.seconds, rng, size)
        mask = _shape_mask(SHAPES[rng.integers(len(SHAPES))], xx, yy, cx, cy, 0.7 * r)
        frames = np.where(mask[..., None], rng.uniform(90, 160), frames)
    frames += rng.normal(0, rng.uniform(2, 10), size=frames.shape)
    frames = np.clip(frames, 0, 255).astype(np.uint8)

    key = f"synth{index:06d}"
    ext = VIDEO_CODECS[spec.codec][1]
    meta = {"labels": [names[label]], "duration": spec.seconds, "split": split,
            "source": f"fastmavil-synth seed={spec.seed} index={index}",
            "event": [round(onset, 3), round(offset, 3)]}
    return key, {ext: encode_video(frames, spec.fps, spec.codec), "flac": encode_flac(wave),
                 "json": meta}


def _describe(index: int) -> str:
    return f"synthetic clip {index}"


def synthesized(out: str | Path, clips: int, heldout: float = 0.2,
                spec: SynthSpec | None = None) -> bool:
    """Whether OUT holds a finished synthetic dataset of `clips` clips (made from `spec`, when
    given): each split's index.json (written last: an interrupted run leaves a split without
    one) counts the split's clips. Another count (a demo rerun with another data.synth_clips)
    is not it; a rerun of synthesize rewrites what differs and finishes the rest."""
    for split, items in split_items(clips, heldout).items():
        if not items:
            continue
        try:
            index = read_index(Path(out) / split)
        except (FileNotFoundError, ValueError):
            return False
        if index["clips"] + index.get("failed", 0) != len(items) or (
                spec is not None and index.get("synth") != asdict(spec)):
            return False
    return True


def split_items(clips: int, heldout: float = 0.2) -> dict[str, range]:
    """The clip numbers of each split: the first `heldout` share is held out."""
    n_heldout = int(round(clips * heldout))
    return {"train": range(n_heldout, clips), "heldout": range(n_heldout)}


def synthesize(out: str | Path, clips: int = 300, heldout: float = 0.2,
               clips_per_shard: int = 100, workers: int = 0, spec: SynthSpec = SynthSpec()
               ) -> dict[str, dict]:
    """Writes OUT/train and OUT/heldout; returns their indices. Reruns resume."""
    if not 0.0 <= heldout < 1.0:
        raise ValueError(f"--heldout {heldout} must lie in [0, 1)")
    splits = split_items(clips, heldout)
    indices = {}
    for split, items in splits.items():
        if not items:
            continue
        indices[split] = write_shards(
            Path(out) / split, list(items), functools.partial(make_clip, spec=spec, split=split),
            _describe, class_names(spec.classes), clips_per_shard, workers,
            title=f"synth {split}", synth=asdict(spec))
    return indices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastmavil-synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (train/ and heldout/ inside)")
    parser.add_argument("--clips", type=int, default=300, help="clips in all (default 300)")
    parser.add_argument("--classes", type=int, default=10,
                        help="sound-visual classes (default 10)")
    parser.add_argument("--heldout", type=float, default=0.2, help="held-out share (default 0.2)")
    parser.add_argument("--seconds", type=float, default=4.0, help="clip length (default 4)")
    parser.add_argument("--size", type=int, default=96,
                        help="frame size in pixels, even (default 96)")
    parser.add_argument("--fps", type=float, default=8.0, help="video frame rate (default 8)")
    parser.add_argument("--codec", choices=list(VIDEO_CODECS), default="vp9",
                        help="video codec (default vp9, which DALI decodes on a CPU)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the dataset is a function of the seed (default 0)")
    parser.add_argument("--clips-per-shard", type=int, default=100,
                        help="clips per tar shard (default 100)")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    for flag, value, ok, rule in (
            ("--clips", args.clips, args.clips >= 1, ">= 1"),
            ("--size", args.size, args.size >= 2 and args.size % 2 == 0, "even and >= 2"),
            ("--seconds", args.seconds, args.seconds > 0, "> 0"),
            ("--fps", args.fps, args.fps > 0, "> 0"),
            ("--classes", args.classes, args.classes >= 1, ">= 1"),
            ("--heldout", args.heldout, 0 <= args.heldout < 1, "in [0, 1)"),
            ("--clips-per-shard", args.clips_per_shard, args.clips_per_shard >= 1, ">= 1"),
            ("--workers", args.workers, args.workers >= 0, ">= 0")):
        if not ok:
            parser.error(f"{flag} {value} must be {rule}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    spec = SynthSpec(args.seed, args.classes, args.seconds, args.size, args.fps, args.codec)
    try:
        class_names(args.classes)
    except ValueError as err:
        parser.error(str(err))
    try:
        indices = synthesize(args.out, args.clips, args.heldout, args.clips_per_shard,
                             args.workers, spec)
    except KeyboardInterrupt:
        return interrupted("fastmavil-synth")
    for split, index in indices.items():
        print(f"{Path(args.out) / split}: {index['clips']} clips in {len(index['shards'])} "
              f"shard(s), {index['failed']} failed")
    return 0 if sum(index["clips"] for index in indices.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
