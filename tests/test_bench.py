"""The benchmarks run end to end on the CPU at tiny sizes and write their records (smoke tests:
speed itself is only ever claimed from real benchmark runs, BENCHMARKS.md)."""
import csv
import json

import pytest

import bench.kernels
import bench.throughput


@pytest.fixture
def results(tmp_path, monkeypatch):
    for module in (bench.kernels, bench.throughput):
        monkeypatch.setattr(module, "RESULTS", tmp_path)
    return tmp_path


def test_throughput_writes_comparison_curriculum_and_profile(results):
    assert bench.throughput.main(["configs/r4.toml", "--size", "tiny", "--steps", "1",
                                  "--repeats", "1", "--warmup", "1", "--profile"]) == 0
    (record_path,) = results.glob("throughput-*-tiny.json")
    record = json.loads(record_path.read_text())
    (r4,) = record["configs"]
    assert r4["speedup"] > 0 and r4["fast"]["step_ms"] > 0 and r4["flops_per_step"] > 0
    view = record["curriculum"]["r4"]
    assert view["shapes"] == len({(e["mask_ratio"], e["batch"]) for e in view["epochs"]}) > 1
    (profile,) = results.glob("profile-*-r4.txt")
    assert "r4 fast path" in profile.read_text()


def test_kernels_appends_rows_with_their_commit(results):
    argv = ["--modalities", "audio", "--ratios", "0.9", "--reps", "1"]
    assert bench.kernels.main(argv) == 0
    assert bench.kernels.main(argv) == 0
    (path,) = results.glob("kernels-*.csv")
    header, *rows = list(csv.reader(path.open()))
    assert header[-2:] == ["commit", "device_ms"]
    assert len(rows) == 2 * 3 * 3  # two runs x three kernels x three modes, references only
    assert {r[1] for r in rows} == {"torch"} and all(r[10] for r in rows)
