"""Clips per second of the reference loader (PyAV + soundfile + torch fbank) and of the DALI
loader (DALI decoding; `fastmavil.data.dali_loader`), by worker (DALI: thread) count.

    python -m bench.dataload                       # demo sizes, 1 and 2 workers, both loaders
    python -m bench.dataload --size small --workers 1 2 --data DIR
    python -m bench.dataload --resume              # + the first batch of a resumed epoch
    python -m bench.dataload --plan                # + the DALI loader's planning alone
    python -m bench.dataload --size base --prep-clips   # clips as fastmavil-prep writes them
    python -m bench.dataload --size base --prep-clips --codec vp9   # the same in VP9 (DALI, CPU)

Generates a synthetic dataset (fastmavil-synth, cached under --data) unless it exists, then
times full training passes (shuffle, random window and roll; worker start-up included; the
rows' passes interleaved, best of `--repeats`) up to the model's input (the video normalised
in this process, as a CPU trainer does; a GPU trainer normalises on the GPU), and writes a
JSON record under bench/results/. Decoding dominates; model sizes only change the output
resolution and the fbank length.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fastmavil.config import Config, ModelConfig
from fastmavil.data.dali_loader import DaliLoader, dali_available, plan
from fastmavil.data.loader import ShardDataset, SkipClip, build_loader, loader_spec, to_device
from fastmavil.data.shards import count_clips, read_shard
from fastmavil.data.synth import SynthSpec, synthesize

from ._report import add_results_option, environment, positive_int, write_json


def _training_dataset(source: Path, size: str) -> ShardDataset:
    cfg = Config(model=ModelConfig(size=size)).check()
    cfg.data.shuffle_buffer = 32  # smaller than the dataset, so batches stream out
    return ShardDataset(source, loader_spec(cfg, train=True))


def time_pass(source: Path, size: str, loader: str, workers: int, batch_size: int,
              epoch: int, dali_device: str = "cpu") -> tuple[int, float]:
    """(clips, seconds) of one training pass (epoch `epoch`'s draws)."""
    dataset = _training_dataset(source, size)
    dataset.set_epoch(epoch)
    start = time.perf_counter()
    batches = (DaliLoader(dataset, batch_size, dali_device, threads=max(1, workers),
                          drop_last=False)
               if loader == "dali" else
               build_loader(dataset, batch_size, num_workers=workers, drop_last=False))
    clips, device = 0, torch.device("cuda" if dali_device == "gpu" else "cpu")
    for batch in batches:  # as the trainer's model gets them: video normalised
        to_device(batch, device, dataset.spec)
        clips += len(batch["keys"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clips, time.perf_counter() - start


def time_rows(source: Path, size: str, rows: list[tuple[str, int]], batch_size: int,
              repeats: int, dali_device: str) -> list[dict]:
    """Each (loader, workers) row's best pass of `repeats`, the rows taking turns, so a drift
    of the machine's speed spreads over all of them."""
    best = {row: (0, float("inf")) for row in rows}
    for epoch in range(repeats):
        for row in rows:
            clips, seconds = time_pass(source, size, *row, batch_size, epoch, dali_device)
            best[row] = (clips, min(best[row][1], seconds))
    return [{"loader": loader, "size": size, "workers": workers, "batch_size": batch_size,
             "clips": clips, "seconds": round(seconds, 3),
             "clips_per_s": round(clips / seconds, 1)}
            for (loader, workers), (clips, seconds) in best.items()]


def time_resume(source: Path, size: str, workers: int, batch_size: int) -> dict:
    """Seconds to the first batch after resuming half-way through an epoch (the loader passes
    over the batches before without decoding them), against reading up to that batch."""
    dataset = _training_dataset(source, size)
    half = count_clips(source) // batch_size // 2
    seconds = {}
    for mode in ("read up to it", "resumed"):
        start = time.perf_counter()
        drop = dataset.set_epoch(0, half if mode == "resumed" else 0, batch_size, workers)
        batches = iter(build_loader(dataset, batch_size, num_workers=workers))
        for _ in range(drop if mode == "resumed" else half):
            next(batches)
        next(batches)
        seconds[mode] = round(time.perf_counter() - start, 3)
    return {"workers": workers, "batch_size": batch_size, "resume_batches": half,
            "first_batch_s": seconds["resumed"], "read_up_to_s": seconds["read up to it"]}


def time_planning(source: Path, size: str, repeats: int) -> dict:
    """The DALI loader's planning alone, in this thread (`dali_loader.plan`: the json, the
    media's headers and packet times, the draws, a VP8/VP9 clip's remux from its window's
    keyframe), best pass of `repeats` over the dataset: where DALI decodes on a GPU, what the
    loader's `data.num_workers` planning threads must keep up with. Needs PyAV, not DALI."""
    dataset = _training_dataset(source, size)
    clips = [clip for shard in dataset.shards for clip in read_shard(shard)]
    best, skipped = float("inf"), 0
    for epoch in range(repeats):
        rng, start, skipped = np.random.default_rng(epoch), time.perf_counter(), 0
        for clip in clips:  # "gpu": every codec passes the check (nothing runs on a GPU)
            try:
                plan(dataset, clip, rng, [epoch], "gpu")
            except SkipClip:  # a damaged clip: the loader passes over it too
                skipped += 1
        best = min(best, time.perf_counter() - start)
    return {"clips": len(clips), "skipped": skipped,
            "ms_per_clip": round(best / len(clips) * 1e3, 2),
            "clips_per_s_per_thread": round(len(clips) / best, 1)}


def _dali_version() -> str:
    import nvidia.dali
    return nvidia.dali.__version__


def _describe_clips(source: Path) -> str:
    """What the dataset holds, from its index (a --data folder may hold other clips)."""
    spec = json.loads((source / "index.json").read_text()).get("synth")
    if not spec:
        return f"clips of {source}"
    return (f"synthetic {spec['seconds']:g} s clips ({spec['codec'].upper()} "
            f"{spec['size']}x{spec['size']} {spec['fps']:g} fps + FLAC)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dataload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="synthetic dataset folder (generated when missing; default "
                             "data/bench-synth, or data/bench-synth-prep with --prep-clips)")
    parser.add_argument("--clips", type=positive_int, default=200)
    parser.add_argument("--prep-clips", action="store_true",
                        help="10 s clips of H.264 256x256 at 16 fps, as fastmavil-prep writes "
                             "(by default), instead of fastmavil-synth's 4 s VP9 96x96 at 8 fps")
    parser.add_argument("--codec", choices=["h264", "vp9"], default=None,
                        help="--prep-clips' codec (default h264, as fastmavil-prep writes; vp9 "
                             "is what DALI decodes on a CPU)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="DataLoader workers (reference) and decoding threads (DALI)")
    parser.add_argument("--loaders", nargs="+", choices=["reference", "dali"], default=None,
                        help="default: both where DALI is installed")
    parser.add_argument("--dali-device", choices=["cpu", "gpu"], default="cpu",
                        help="where DALI decodes (gpu: NVDEC, needed for --prep-clips' H.264)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=2,
                        help="passes per row; the best counts")
    add_results_option(parser)
    parser.add_argument("--resume", action="store_true",
                        help="also time the first batch after resuming half-way through an epoch")
    parser.add_argument("--plan", action="store_true",
                        help="also time the DALI loader's planning alone, in one thread")
    args = parser.parse_args(argv)
    if min(args.workers) < 0:
        parser.error(f"--workers {' '.join(map(str, args.workers))}: each must be >= 0")
    if args.codec and not args.prep_clips:
        parser.error("--codec goes with --prep-clips (fastmavil-synth's clips are VP9)")
    codec = args.codec or "h264"
    synth = SynthSpec(seconds=10.0, size=256, fps=16.0, codec=codec) if args.prep_clips \
        else SynthSpec()
    prep = f"-prep{'-vp9' if codec == 'vp9' else ''}" if args.prep_clips else ""
    data = args.data or Path("data/bench-synth" + prep)
    source = data / "train"
    if not (source / "index.json").exists():
        synthesize(data, clips=args.clips, heldout=0.0, spec=synth)
    clip_text = _describe_clips(source)
    dali_decodes = synth.codec != "h264" or args.dali_device == "gpu"  # no H.264 on a CPU
    loaders = args.loaders or ["reference"] + (["dali"] if dali_available() and dali_decodes
                                               else [])
    if "dali" in loaders and not dali_available():
        parser.error("--loaders dali: NVIDIA DALI is not installed")
    if "dali" in loaders and not dali_decodes:
        parser.error("--prep-clips are H.264, which DALI decodes on the GPU only: add "
                     "--dali-device gpu, --codec vp9, or --loaders reference")
    if not args.loaders and dali_available() and not dali_decodes:
        print("the DALI loader is left out: DALI decodes H.264 on the GPU only (--codec vp9 or "
              "--dali-device gpu)")
    rows = time_rows(source, args.size, [(loader, w) for loader in loaders for w in args.workers],
                     args.batch_size, args.repeats, args.dali_device)

    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"Loaders, {args.size} sizes, {rows[0]['clips']} {clip_text}")
    for column in ("loader", "workers", "clips/s", "seconds", "vs reference"):
        table.add_column(column, justify="right")
    reference = {r["workers"]: r["clips_per_s"] for r in rows if r["loader"] == "reference"}
    for row in rows:
        ratio = row["clips_per_s"] / reference[row["workers"]] \
            if row["workers"] in reference else None
        table.add_row(row["loader"], str(row["workers"]), f"{row['clips_per_s']:.1f}",
                      f"{row['seconds']:.2f}", f"{ratio:.2f}x" if ratio else "-")
    Console().print(table)
    resumes = ([time_resume(source, args.size, w, args.batch_size) for w in args.workers]
               if args.resume else [])
    for row in resumes:
        print(f"{row['workers']} worker(s): first batch after resuming at batch "
              f"{row['resume_batches']} in {row['first_batch_s']:.2f} s; reading up to it took "
              f"{row['read_up_to_s']:.2f} s")
    planning = time_planning(source, args.size, args.repeats) if args.plan else None
    if planning:
        print(f"DALI loader's planning, one thread: {planning['ms_per_clip']:.2f} ms a clip, "
              f"{planning['clips_per_s_per_thread']:.1f} clips/s")
    import av
    record = {"bench": "dataload", **environment(torch.device("cpu")),
              "cpus": os.cpu_count(), "pyav": av.__version__, "clips": clip_text, "rows": rows,
              **({"dali": _dali_version(), "dali_device": args.dali_device}
                 if "dali" in loaders else {}),
              **({"resume": resumes} if resumes else {}),
              **({"planning": planning} if planning else {})}
    name = (f"dataload-cpu-{args.size}{prep}{'-resume' if args.resume else ''}"
            f"{'-plan' if args.plan else ''}.json")  # a run of one never overwrites another
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / name
    write_json(out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
