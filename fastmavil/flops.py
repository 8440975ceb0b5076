"""Forward FLOPs per module, counted from the real model (paper Table 5).

The model runs one training forward at batch 1 on the meta device under torch's
FlopCounterMode, with the explicit-softmax attention so every attention matmul is counted.
Counts are per sample, averaged over the config's masking schedule across its epochs (every
epoch sees the same number of samples, so the per-sample mean is the mean over epochs).
Both masked views pass through the encoders, as in the training step.

    fastmavil-flops configs/r1.toml configs/r2.toml configs/r3.toml --baseline configs/mavil.toml
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import Config, ConfigError, load_config, split_overrides
from .models import build_model
from .models.attention import set_attention_backend
from .schedule import quantized_mask_ratio

MODULES = ("audio_encoder", "audio_decoder", "video_encoder", "video_decoder", "fusion")
COLUMNS = MODULES + ("total",)


def count_forward(model, mask_ratio_value: float) -> dict[str, float]:
    """FLOPs of one training forward of `model` (built on meta) for one sample, by module."""
    m = model.cfg.model
    audio = torch.empty(1, 1, m.audio_frames, m.mel_bins, device="meta")
    video = torch.empty(1, 3, m.video_frames, m.video_size, m.video_size, device="meta") \
        if m.has_video else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(audio, video, mask_ratio=mask_ratio_value)
    by_module = counter.get_flop_counts()
    root = type(model).__name__
    flops = {name: float(sum(by_module.get(f"{root}.{name}", {}).values())) for name in MODULES}
    flops["total"] = float(counter.get_total_flops())
    return flops


def _meta_model(cfg: Config):
    """The model without memory, with the explicit-softmax attention the counter can see."""
    with torch.device("meta"):
        model = build_model(cfg)
    set_attention_backend(model, "math")
    return model


_counted: dict[tuple[str, float], float] = {}  # (model-defining config, ratio) -> FLOPs


def forward_flops_per_sample(cfg: Config, ratios) -> dict[float, float]:
    """Total forward FLOPs per sample at each masking ratio, counted on the meta device (about
    a second per ratio at paper size, so counts are kept: the schedule and the trainer ask)."""
    key = repr((cfg.model, cfg.loss, cfg.diffusion))  # what build_model and forward read
    missing = [r for r in ratios if (key, r) not in _counted]
    if missing:
        model = _meta_model(cfg)
        _counted.update({(key, r): count_forward(model, r)["total"] for r in missing})
    return {r: _counted[key, r] for r in ratios}


def schedule_flops(cfg: Config) -> dict[str, float]:
    """Per-sample forward FLOPs by module, averaged over the masking ratio of every epoch as the
    trainer runs it (snapped to `train.max_shapes` levels)."""
    model = _meta_model(cfg)
    epochs = cfg.train.epochs
    # FLOPs depend on the ratio only through the visible counts: count each distinct shape once.
    shapes = Counter()
    ratio_of_shape = {}
    for epoch in range(epochs):
        ratio = quantized_mask_ratio(cfg.mask, epoch, epochs, cfg.train.max_shapes)
        shape = cfg.model.visible_tokens(ratio)
        shapes[shape] += 1
        ratio_of_shape.setdefault(shape, ratio)
    total = dict.fromkeys(COLUMNS, 0.0)
    for shape, n_epochs in shapes.items():
        for key, value in count_forward(model, ratio_of_shape[shape]).items():
            total[key] += value * n_epochs / epochs
    return total


def ratios(flops: dict[str, float], baseline: dict[str, float]) -> dict[str, float | None]:
    return {k: (flops[k] / baseline[k] if baseline[k] else None) for k in COLUMNS}


def _print_table(results: dict[str, dict[str, float]], baseline_name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    base = results[baseline_name]
    table = Table(title="Forward GFLOPs per sample (ratio to the baseline)",
                  caption=f"baseline: {baseline_name}; averaged over each config's masking "
                          "schedule; encoders count both masked views")
    table.add_column("config", no_wrap=True)
    for name in COLUMNS:
        table.add_column(name.replace("_", " "), justify="right")
    for name, flops in results.items():
        r = ratios(flops, base)
        table.add_row(name, *(f"{_gflops(flops[k])} ({r[k]:.2f})" if r[k] is not None
                              else _gflops(flops[k]) for k in COLUMNS))
    # wide enough that config paths and cells never wrap, even when piped
    width = max(len(name) for name in results) + 17 * len(COLUMNS) + 10
    Console(width=max(Console().width, width)).print(table)


def _gflops(flops: float) -> str:
    """GFLOPs with one decimal, or three significant digits below 10 (tiny models)."""
    g = flops / 1e9
    return f"{g:.1f}" if g >= 10 else f"{g:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastmavil-flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="TOML configs to count")
    parser.add_argument("--baseline", help="config the ratios are relative to (default: the first)")
    parser.add_argument("--json", action="store_true",
                        help="print {config: {module: ratio to baseline}} as JSON")
    parser.epilog = "Config keys can be overridden for every config: --model.size small"
    try:
        rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        parser.error(str(err))
    args = parser.parse_args(rest)
    names = list(dict.fromkeys(([args.baseline] if args.baseline else []) + args.configs))
    try:
        results = {name: schedule_flops(load_config(name, overrides)) for name in names}
    except ConfigError as err:
        print(f"fastmavil-flops: {err}", file=sys.stderr)
        return 2
    baseline = args.baseline or args.configs[0]
    if args.json:
        print(json.dumps({name: ratios(results[name], results[baseline])
                          for name in args.configs}, indent=2))
    else:
        _print_table(results, baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
