import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from fastmavil.flops import COLUMNS, count_forward, main
from fastmavil.masking import num_visible
from fastmavil.models import build_model
from fastmavil.models.attention import set_attention_backend

from conftest import tiny_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Paper Table 5 (relative to MAViL): audio enc, audio dec, video enc, video dec, fusion, total.
TABLE5 = {"r2": (1.0, 1.0, 0.97, 0.53, 1.0, 0.81), "r3": (0.74, 1.0, 0.72, 0.54, 0.74, 0.68)}


def test_encoder_flops_match_the_transformer_formula():
    """Counting sees every matmul, attention included (FlopCounterMode drops fused CPU SDPA,
    hence the math backend): check against 2 * MACs written out by hand."""
    cfg = tiny_config("diffmavil", "cross")
    with torch.device("meta"):
        model = build_model(cfg)
    set_attention_backend(model, "math")
    flops = count_forward(model, 0.8)
    m = cfg.model
    d, depth, views = m.encoder_dim, m.encoder_depth, 2
    n = num_visible(64, 0.8)                              # audio grid 8 x 8
    patch = 2 * n * 256 * d                               # visible patches only (mask first)
    block = 2 * n * d * (3 * d + d + 2 * 4 * d) + 2 * 2 * n * n * d  # linears + qk^T and av
    assert flops["audio_encoder"] == views * (patch + depth * block)


@pytest.fixture(scope="module")
def paper_ratios():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--json", *(str(CONFIGS / f"{r}.toml") for r in ("r1", "r2", "r3")),
                     "--baseline", str(CONFIGS / "mavil.toml")])
    assert code == 0
    return {Path(k).stem: v for k, v in json.loads(out.getvalue()).items()}


@pytest.mark.parametrize("row", ["r2", "r3"])
def test_paper_table5(paper_ratios, row):
    got = paper_ratios[row]
    assert set(got) == set(COLUMNS)
    for column, expected in zip(COLUMNS, TABLE5[row]):
        tolerance = 0.02 if column == "total" else 0.03
        assert got[column] == pytest.approx(expected, abs=tolerance), (row, column)


def test_r1_differs_from_mavil_only_by_patch_order_and_diffused_inputs(paper_ratios):
    r1 = paper_ratios["r1"]
    assert r1["video_encoder"] < 1.0 < r1["video_decoder"]  # App. D: mask-first; projected x_t
    assert r1["fusion"] == 1.0 and r1["total"] == pytest.approx(1.0, abs=0.01)


def test_cli_table_and_config_errors(tmp_path, capsys):
    tiny = tmp_path / "tiny.toml"
    tiny.write_text("[model]\nsize = 'tiny'\n[mask]\nschedule = 'linear'\nstart = 0.9\nend = 0.8\n"
                    "[train]\nepochs = 3\n[optim]\nwarmup_epochs = 1\n")
    assert main([str(tiny)]) == 0
    printed = capsys.readouterr().out
    assert "GFLOPs" in printed and "tiny.toml" in printed and "(1.00)" in printed
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nsise = 'tiny'\n")
    assert main([str(bad)]) == 2
    assert "bad.toml: unknown key model.sise" in capsys.readouterr().err
    # overrides apply to every config; a tiny model's cells show its small counts
    assert main(["--model.size", "tiny", str(CONFIGS / "r4.toml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[str(CONFIGS / "r4.toml")]["total"] == 1.0
    assert main([str(tiny)]) == 0 and " 0.0 " not in capsys.readouterr().out
    assert main([str(tiny), "--model.sise", "tiny"]) == 2
    assert "command line --model.sise tiny: unknown key" in capsys.readouterr().err
