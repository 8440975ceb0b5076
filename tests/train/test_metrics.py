import json
import logging
import math
import mmap
import sys
import time
import types

import numpy as np
import pytest
import torch

from fastmavil.train import metrics
from fastmavil.train.metrics import (GpuUtilization, MetricsWriter, StepTimer,
                                     device_peak_flops, gpu_peak_flops,
                                     measure_cpu_matmul_peak, mfu, nvml_index,
                                     peak_memory_bytes, reset_peak_memory, tflops)


@pytest.mark.parametrize("name,dtype,tf32,tflop", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.4),
    ("NVIDIA H100 80GB HBM3", torch.float32, True, 494.7),
    ("NVIDIA H100 80GB HBM3", torch.float32, False, 66.9),
    ("NVIDIA H100 PCIe", torch.bfloat16, False, 756.0),
    ("NVIDIA H100 PCIe", torch.float32, True, 378.0),
    ("NVIDIA H100 PCIe", torch.float32, False, 51.0),
    ("NVIDIA H200", torch.bfloat16, False, 989.4),
    ("NVIDIA H200", torch.float16, False, 989.4),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False, 312.0),
    ("NVIDIA A100 80GB PCIe", torch.float32, True, 156.0),
    ("NVIDIA A100-SXM4-40GB", torch.float32, False, 19.5),
])
def test_gpu_peak_flops_by_name(name, dtype, tf32, tflop):
    assert gpu_peak_flops(name, dtype, tf32) == pytest.approx(tflop * 1e12)


def test_gpu_peak_flops_unknown():
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090", torch.bfloat16, False) is None
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.float64, False) is None


def test_cpu_matmul_peak_plausible_and_cached():
    first = measure_cpu_matmul_peak(size=256, seconds=0.15)
    assert first > 1e8
    start = time.perf_counter()
    assert measure_cpu_matmul_peak(size=256, seconds=0.15) == first
    assert time.perf_counter() - start < 0.05


def test_device_peak_flops_cpu():
    peak, source = device_peak_flops(torch.device("cpu"), torch.float32)
    assert isinstance(peak, float) and peak > 1e8
    assert "measured" in source and f"{torch.get_num_threads()} threads" in source
    # bf16 on CPU is measured against the (cached) fp32 peak, not a slow bf16 matmul.
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) == (peak, source)


def test_device_peak_flops_cuda_from_datasheet(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # TF32 on
    assert device_peak_flops(torch.device("cuda", 0), torch.bfloat16) == (
        pytest.approx(989.4e12), "H200 datasheet bf16")
    assert device_peak_flops(torch.device("cuda", 0), torch.float32)[1] == "H200 datasheet tf32"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert device_peak_flops(torch.device("cuda", 0), torch.float32)[1] == "H200 datasheet fp32"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    peak, source = device_peak_flops(torch.device("cuda", 0), torch.float16)
    assert peak is None and "Tesla T4" in source


def test_mfu_and_tflops():
    assert tflops(6e12, 2.0) == pytest.approx(3.0)
    assert mfu(3e14, 1.0, 1e15) == pytest.approx(0.3)
    assert mfu(3e14, 0.5, 1e15) == pytest.approx(0.6)
    assert mfu(3e14, 1.0, None) is None


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * metrics.resource.getpagesize()


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/statm")
def test_peak_memory_cpu_grows():
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)  # a no-op on CPU
    before = peak_memory_bytes(cpu)
    assert before > 0
    # Enough fresh pages to push the resident set past the old peak, whatever it is now: an
    # anonymous mapping, since malloc may hand back freed memory that is still resident.
    extra = before - _resident_bytes() + (64 << 20)
    with mmap.mmap(-1, extra) as pages:
        np.frombuffer(pages, dtype=np.uint8)[:] = 1  # write every page so it becomes resident
        assert peak_memory_bytes(cpu) > before


def test_nvml_index_mapping():
    assert nvml_index(1, "3,5") == 5
    assert nvml_index(0, " 3, 5") == 3
    assert nvml_index(1, "") == 1
    assert nvml_index(1, "GPU-8f6e0c1a,GPU-1d2b3c4d") == 1  # UUIDs: falls back
    assert nvml_index(2, "3,5") == 2  # out of range: falls back


def test_nvml_index_reads_environment(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert nvml_index(1) == 5


def test_gpu_utilization_inert_on_cpu(caplog):
    with caplog.at_level(logging.INFO, logger="fastmavil.train"):
        util = GpuUtilization(torch.device("cpu"), interval=0.01)
    assert "GPU utilisation not reported" in caplog.text
    util.start()
    util.stop()
    assert util.mean() is None
    with util as same:
        assert same is util
    assert util.mean() is None


def test_gpu_utilization_inert_without_pynvml(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with caplog.at_level(logging.INFO, logger="fastmavil.train"):
        util = GpuUtilization(torch.device("cuda", 0))
    assert "nvidia-ml-py" in caplog.text
    util.start()
    util.stop()
    assert util.mean() is None


def _fake_pynvml(percent: int, opened: list, fail_init: bool = False) -> types.ModuleType:
    fake = types.ModuleType("pynvml")

    def nvml_init():
        if fail_init:
            raise RuntimeError("driver/library version mismatch")

    def handle_by_index(index):
        opened.append(index)
        return f"handle-{index}"

    fake.nvmlInit = nvml_init
    fake.nvmlShutdown = lambda: opened.append("shutdown")
    fake.nvmlDeviceGetHandleByIndex = handle_by_index
    fake.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=percent,
                                                                               memory=0)
    return fake


def test_gpu_utilization_samples_fake_nvml(monkeypatch):
    opened = []
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(73, opened))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with GpuUtilization(torch.device("cuda", 1), interval=0.01) as util:
        time.sleep(0.05)
    assert opened == [5, "shutdown"]
    assert util.mean() == pytest.approx(73.0)
    util.reset()
    assert util.mean() is None


def test_gpu_utilization_reads_within_the_window_and_at_its_end(monkeypatch):
    """NVML's figure describes its last sample period: a reading at start would describe the
    time before the window. A window shorter than the interval gets one reading, at stop."""
    fake = _fake_pynvml(0, [])
    reads = []
    fake.nvmlDeviceGetUtilizationRates = lambda handle: (
        reads.append(time.monotonic()) or types.SimpleNamespace(gpu=60 + len(reads), memory=0))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with GpuUtilization(torch.device("cuda", 0), interval=10.0) as util:
        time.sleep(0.05)
        stopping = time.monotonic()
        util.stop()
    assert len(reads) == 1 and reads[0] >= stopping and util.mean() == 61.0


def test_gpu_utilization_releases_nvml_when_the_device_is_missing(monkeypatch, caplog):
    opened = []
    fake = _fake_pynvml(73, opened)

    def no_handle(index):
        raise RuntimeError("invalid argument")
    fake.nvmlDeviceGetHandleByIndex = no_handle
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="fastmavil.train"):
        util = GpuUtilization(torch.device("cuda", 0), interval=0.01)
    assert "invalid argument" in caplog.text and opened == ["shutdown"]
    with util:
        pass
    assert util.mean() is None and opened == ["shutdown"]


def test_gpu_utilization_nvml_init_fails(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(73, [], fail_init=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="fastmavil.train"):
        util = GpuUtilization(torch.device("cuda", 0), interval=0.01)
    assert "version mismatch" in caplog.text
    with util:
        time.sleep(0.02)
    assert util.mean() is None


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_writer_jsonl(tmp_path):
    with MetricsWriter(tmp_path / "run", tensorboard=False) as writer:
        writer.write({"step": 1, "loss": torch.tensor(0.5), "lr": 1e-4, "note": "warmup"})
        writer.write({"step": 2, "loss": float("nan"), "grad_norm": torch.tensor(math.inf),
                      "seen": np.int64(7)})
        # Flushed per record: readable before close.
        assert len(_records(tmp_path / "run" / "metrics.jsonl")) == 2
    assert _records(tmp_path / "run" / "metrics.jsonl") == [
        {"step": 1, "loss": 0.5, "lr": 1e-4, "note": "warmup"},
        {"step": 2, "loss": None, "grad_norm": None, "seen": 7},
    ]


def test_metrics_writer_appends_on_reopen(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write({"step": 1, "loss": 1.0})
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write({"step": 2, "loss": 0.9})
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1, 2]


def test_metrics_writer_resumed_drops_the_records_it_replays(tmp_path):
    """An attempt logged steps 1-5 and crashed (its last line cut short) after its checkpoint at
    step 3: the resumed writer keeps steps 1-3, so steps 4-5, replayed, appear once."""
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(1, 6):
            writer.write({"step": step, "loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 6, "lo')
    with MetricsWriter(tmp_path, tensorboard=False, start_step=3) as writer:
        writer.write({"step": 4, "loss": 0.5})
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not list(tmp_path.glob("*.tmp"))
    # a last record complete but for its newline: the next one still gets its own line
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}')
    with MetricsWriter(tmp_path, tensorboard=False, start_step=2) as writer:
        writer.write({"step": 3})
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_metrics_writer_requires_step(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(KeyError, match="step"):
            writer.write({"loss": 1.0})


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def no_tensorboard(monkeypatch):
    """The tensorboard package hidden, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def test_metrics_writer_tensorboard_required_but_missing(tmp_path, no_tensorboard):
    with pytest.raises(RuntimeError, match="pip install tensorboard"):
        MetricsWriter(tmp_path, tensorboard=True)


def test_metrics_writer_without_tensorboard_writes_jsonl_and_says_so(tmp_path, caplog,
                                                                     no_tensorboard):
    with caplog.at_level(logging.INFO, logger="fastmavil.train"):
        with MetricsWriter(tmp_path) as writer:
            writer.write({"step": 1, "loss": 1.0})
    assert "tensorboard package is not installed" in caplog.text
    assert _records(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    assert not (tmp_path / "tensorboard").exists()


def _scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


@pytest.mark.skipif(not _has_tensorboard(), reason="the tensorboard package is not installed "
                    "(optional: pip install tensorboard)")
def test_metrics_writer_tensorboard_resumed_purges_replayed_steps(tmp_path):
    """Steps 1-5 logged, checkpoint at 3, crash: the resumed writer's TensorBoard run shows
    steps 4-5 once, with the replayed values, and only numeric fields become scalars."""
    with MetricsWriter(tmp_path, tensorboard=True) as writer:
        for step in range(1, 6):
            writer.write({"step": step, "loss": 1.0, "note": "first", "done": False})
    with MetricsWriter(tmp_path, tensorboard=True, start_step=3) as writer:
        for step in range(4, 6):
            writer.write({"step": step, "loss": 0.5})
    assert _scalars(tmp_path / "tensorboard", "train/loss") == [
        (1, 1.0), (2, 1.0), (3, 1.0), (4, 0.5), (5, 0.5)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["train/loss"]


@pytest.fixture
def clock(monkeypatch):
    """StepTimer's clock, moved by hand: `clock.wait(seconds)` stands in for time passing."""
    now = types.SimpleNamespace(t=100.0)
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now.t)
    now.wait = lambda seconds: setattr(now, "t", now.t + seconds)
    return now


def test_step_timer_data_wait_share(clock):
    timer = StepTimer()
    syncs = []
    for _ in range(3):
        clock.wait(0.01)  # waiting for the batch
        timer.data_ready()
        clock.wait(0.03)  # the step
        timer.step_done()
    summary = timer.summary(sync=lambda: syncs.append(1))
    assert syncs == [1]
    assert summary["steps"] == 3
    assert summary["data_wait_share"] == pytest.approx(0.25)
    assert summary["step_ms"] == pytest.approx(40.0)
    # The next summary covers only the steps after this one.
    timer.data_ready()
    clock.wait(0.02)
    timer.step_done()
    assert timer.summary(sync=lambda: syncs.append(1))["step_ms"] == pytest.approx(20.0)
    assert syncs == [1, 1]


def test_step_timer_without_steps():
    assert StepTimer().summary() == {"step_ms": None, "data_wait_share": None, "steps": 0}


def test_step_timer_does_not_count_compute_between_micro_batches_as_data_wait(clock):
    timer = StepTimer()
    for _ in range(2):
        for micro in range(3):
            if micro:
                timer.fetch_start()
                clock.wait(0.002)         # the next micro-batch's fetch
            timer.data_ready()
            clock.wait(0.01)              # compute of one micro-batch
        timer.step_done()
    summary = timer.summary()
    assert summary["data_wait_share"] == pytest.approx(0.004 / 0.034)
    assert summary["step_ms"] == pytest.approx(34.0)


def test_step_timer_leaves_a_checkpoints_save_out(clock):
    """A save between steps is neither compute nor data wait (the trainers' checkpoints)."""
    timer, syncs = StepTimer(), []
    for step in range(2):
        timer.data_ready()            # data at once
        clock.wait(0.02)              # the step
        timer.step_done()
        if step == 0:
            with timer.left_out(sync=lambda: syncs.append(1)):
                clock.wait(3.0)       # the save
    summary = timer.summary()
    assert syncs == [1]
    assert summary["step_ms"] == pytest.approx(20.0) and summary["data_wait_share"] == 0
