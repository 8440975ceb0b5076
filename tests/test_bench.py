"""The benchmarks run end to end on the CPU at tiny sizes and write their records (smoke tests:
speed itself is only ever claimed from real benchmark runs, BENCHMARKS.md)."""
import csv
import json
import os
import pathlib
import re
import statistics
import subprocess
import tarfile
import types

import pytest
import torch

import bench._report
import bench.attention
import bench.dataload
import bench.kernels
import bench.throughput
import bench.train
from fastmavil.data.dali_loader import dali_available

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def results(tmp_path, monkeypatch):
    """The benches' default records folder, moved to a temporary one (--results' default)."""
    monkeypatch.setattr(bench._report, "RESULTS", tmp_path)
    return tmp_path


def test_throughput_writes_comparison_curriculum_and_profile(results):
    assert bench.throughput.main(["configs/r4.toml", "configs/r1.toml", "--size", "tiny",
                                  "--steps", "1", "--repeats", "2", "--warmup", "1", "--profile",
                                  "--batch-rule", "flops", "--passes", "fit"]) == 0
    (record_path,) = results.glob("throughput-*-tiny-flops-fit.json")
    record = json.loads(record_path.read_text())
    r4, r1 = record["configs"]
    assert r4["speedup"] > 0 and r4["fast"]["step_ms"] > 0 and r4["flops_per_step"] > 0
    assert r4["fast"]["warmup_s"] > 0 and r4["reference"]["warmup_s"] > 0
    for path in ("fast", "reference"):  # each repeat kept; the figure is their median
        assert len(r4[path]["step_ms_repeats"]) == 2
        repeats = r4[path]["step_ms_repeats"]
        assert r4[path]["step_ms"] == pytest.approx(statistics.median(repeats))
        # a CPU's peak memory is the process's whole life: not reported as a path's
        assert r4[path]["peak_memory_gb"] is None
    assert r4["fast_runs_kernels"] is False  # no CUDA: the kernels' references
    assert record["torch"] == torch.__version__ and record["python"] and record["commit"]
    assert "triton" in record and "cuda" not in record  # a GPU's record adds CUDA's, driver's
    view = record["curriculum"]["r4"]
    assert view["shapes"] == len({(e["mask_ratio"], e["batch"]) for e in view["epochs"]}) > 1
    assert view["batch_rule"] == "flops" and view["passes_per_step"] == "fit"
    # B0 = 8 on a CPU: the token rule would start at 16, the FLOPs rule below it
    assert 16 > view["epochs"][0]["batch"] > view["epochs"][-1]["batch"] == 8
    # r4.toml's passes of 8 at B0 = 2048, timed at 8 / 8 of their size, in as many passes as
    # keep B * F(rho) within half a pass of the budget (+-5.3 % in 256 passes at this size)
    assert view["flops_spread"] <= 0.005
    assert all(e["tflop_per_step"] > 0 for e in view["epochs"])
    # R1, the projection's baseline, timed as R4 is: fast path alone at B0, one shape
    baseline = record["curriculum"]["r1"]
    assert baseline["shapes"] == 1 and baseline["batch_rule"] == "fixed"
    assert baseline["passes_per_step"] == "fixed"  # R1's batch is fixed: nothing to fit
    assert {e["batch"] for e in baseline["epochs"]} == {r1["batch"]} == {8}
    assert view["relative_to_r1"] == pytest.approx(view["mean_epoch_s"]
                                                   / baseline["mean_epoch_s"])
    (profile,) = results.glob("profile-*-r4-flops-fit.txt")
    assert "r4 fast path" in profile.read_text()


@pytest.mark.parametrize("mode", ["backward", "forward+backward"])
def test_kernels_times_each_backward_from_cleared_gradients(mode):
    """No call adds into the last call's .grad (an add per leaf both providers paid)."""
    w = torch.randn(3, requires_grad=True)
    fn = bench.kernels._timed_fn(lambda: (w * 2).sum(), mode, [w])
    fn()
    fn()
    assert torch.equal(w.grad, torch.full((3,), 2.0))


def test_dataload_writes_the_resume_timing_beside_the_plain_record(results, tmp_path):
    """--resume adds a timing and its own record name: the plain run's record stays. --plan
    adds the DALI loader's planning alone (no DALI needed)."""
    args = ["--data", str(tmp_path / "synth"), "--clips", "8", "--workers", "0",
            "--batch-size", "2", "--repeats", "1"]
    assert bench.dataload.main(args) == 0
    assert bench.dataload.main([*args, "--resume", "--plan"]) == 0
    plain = json.loads((results / "dataload-cpu-tiny.json").read_text())
    resumed = json.loads((results / "dataload-cpu-tiny-resume-plan.json").read_text())
    assert "resume" not in plain and resumed["resume"][0]["resume_batches"] == 2
    assert "planning" not in plain and resumed["planning"]["clips"] == 8
    assert resumed["planning"]["skipped"] == 0
    loaders = ["reference"] + (["dali"] if dali_available() else [])
    assert [(r["loader"], r["clips"]) for r in plain["rows"]] == [(l, 8) for l in loaders]


def test_throughput_compares_the_first_config_alone(results):
    assert bench.throughput.main(["configs/r4.toml", "configs/r1.toml", "--size", "tiny",
                                  "--steps", "1", "--repeats", "1", "--warmup", "1",
                                  "--compare-first", "--no-curriculum", "--passes", "fit"]) == 0
    (record_path,) = results.glob("throughput-*-tiny-fit-first.json")
    assert [r["config"] for r in json.loads(record_path.read_text())["configs"]] == [
        "configs/r4.toml"]


def test_kernels_appends_rows_with_their_commit(results, monkeypatch):
    monkeypatch.setenv("FASTMAVIL_COMMIT", "abc1234")
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    path = results / f"kernels-{name.replace(' ', '_')}.csv"
    legacy = bench.kernels.HEADER[:-1]  # a record from before the device_ms column
    path.write_text(",".join(legacy) + "\n" + ",".join(["old"] * len(legacy)) + "\n")
    argv = ["--modalities", "audio", "--ratios", "0.9", "--reps", "1"]
    assert bench.kernels.main(argv + ["--dtype", "fp32"]) == 0
    assert bench.kernels.main(argv + ["--dtype", "amp"]) == 0  # as in training: autocast
    header, old, *rows = list(csv.reader(path.open()))
    assert header == bench.kernels.HEADER and old == ["old"] * len(legacy) + [""]
    providers = {"torch", "triton"} if torch.cuda.is_available() else {"torch"}  # CPU: refs only
    kernels = {r[0] for r in rows}
    assert kernels == {"patch_embed_visible", "diffuse_embed_masked", "masked_patch_mse"}
    assert len(rows) == 2 * len(kernels) * 3 * len(providers)  # two runs x kernels x 3 modes
    assert {r[1] for r in rows} == providers and {r[10] for r in rows} == {"abc1234"}
    assert {r[3] for r in rows} == {"audio B=32 rho=0.9 fp32", "audio B=32 rho=0.9 amp"}


def test_attention_times_each_call_site_of_the_model_with_both_backends(results):
    # SDPA's CPU flash kernel takes the calls without a bias; the memory-efficient one none
    assert bench.attention.main(["configs/r4.toml", "--size", "tiny", "--reps", "1",
                                 "--sdpa-kernels", "flash", "efficient"]) == 0
    (path,) = results.glob("attention-*-tiny.json")
    record = json.loads(path.read_text())
    sites = {s["site"]: s for s in record["sites"]}
    # the encoders' self-attention, the cross-attention video decoder, the Swin audio decoder's
    # windows (4 x 4 in the tiny config too) with their learned position bias
    assert any(site.endswith("x16x16 learned") for site in sites), sites
    assert any(s.split(" k ")[0].split("x")[2] != s.split(" k ")[1].split("x")[0]
               for s in sites), sites  # queries and keys of different lengths
    assert all(s["calls"] >= 1 and s["sdpa_ms"] > 0 and s["math_ms"] > 0 for s in sites.values())
    assert record["total_ms"]["sdpa"] > 0 and record["total_ms"]["math"] > 0
    assert all(s["sdpa:efficient_ms"] is None for s in sites.values())
    assert {s["sdpa:flash_ms"] is None for s in sites.values()} == {True, False}
    assert record["total_ms"]["sdpa:flash"] is None  # it cannot take every call
    assert all(s[f"{s['fastest']}_ms"] == min(v for k, v in s.items() if k.endswith("_ms")
                                              and v is not None) for s in sites.values())


def test_attention_times_the_window_kernels_where_the_bias_is_shared(monkeypatch):
    """The "window" backend times kernels.window_attention at a Swin site (a (G, L, L) bias)
    and gives no time where it does not apply (no bias; or where it cannot launch)."""
    import kernels
    import kernels.window_attention as wa
    calls = []
    monkeypatch.setattr(wa, "window_attention",
                        lambda *a: calls.append(a) or wa.reference_window_attention(*a))
    cpu = torch.device("cpu")
    swin = ((2, 6, 16, 8), (2, 6, 16, 8), ((6, 16, 16), True))
    monkeypatch.setattr(kernels, "can_launch", lambda name, *tensors: True)
    assert bench.attention.time_site(swin, "window", cpu, torch.float32, 1) > 0 and calls
    assert bench.attention.time_site((swin[0], swin[1], None), "window", cpu, torch.float32,
                                     1) is None
    monkeypatch.setattr(kernels, "can_launch", lambda name, *tensors: False)
    assert bench.attention.time_site(swin, "window", cpu, torch.float32, 1) is None


def test_attention_times_the_sequence_kernels_where_there_is_no_bias(monkeypatch):
    """The "triton" backend times kernels.attention on packed projections: self-attention where
    queries and keys share a shape, cross-attention otherwise, none where there is a bias or
    where the kernels cannot launch; "sdpa-packed" times SDPA from the same projections."""
    import kernels
    import kernels.attention as ka
    calls = []
    for name in ("self_attention", "cross_attention"):
        reference = getattr(ka, f"reference_{name}")
        monkeypatch.setattr(ka, name, lambda *a, name=name, reference=reference:
                            calls.append((name, tuple(a[0].shape))) or reference(*a))
    cpu = torch.device("cpu")
    monkeypatch.setattr(kernels, "can_launch", lambda name, *tensors: True)
    for k_len, op, shape in ((5, "self_attention", (2, 5, 96)),
                             (7, "cross_attention", (2, 5, 32))):
        calls.clear()
        site = ((2, 2, 5, 16), (2, 2, k_len, 16), None)
        assert bench.attention.time_site(site, "triton", cpu, torch.float32, 1) > 0
        assert calls and set(calls) == {(op, shape)}
    biased = ((2, 2, 5, 16), (2, 2, 5, 16), ((2, 5, 5), True))
    assert bench.attention.time_site(biased, "triton", cpu, torch.float32, 1) is None
    # SDPA from the same packed projections: the modules' own path, no kernels called
    calls.clear()
    for k_len in (5, 7):
        site = ((2, 2, 5, 16), (2, 2, k_len, 16), None)
        assert bench.attention.time_site(site, "sdpa-packed", cpu, torch.float32, 1) > 0
    assert not calls
    assert bench.attention.time_site(biased, "sdpa-packed", cpu, torch.float32, 1) is None
    monkeypatch.setattr(kernels, "can_launch", lambda name, *tensors: False)
    assert bench.attention.time_site(biased[:2] + (None,), "triton", cpu, torch.float32,
                                     1) is None


def test_kernel_breakdown_is_per_call_and_longest_first():
    rows = [types.SimpleNamespace(key="index_add", self_device_time_total=300.0, count=20),
            types.SimpleNamespace(key="gemm", self_device_time_total=500.0, count=40)]
    assert bench._report.breakdown(rows, reps=20) == [("gemm", 25.0, 2.0),
                                                      ("index_add", 15.0, 1.0)]


def test_profile_sums_device_time_by_kind_of_kernel():
    """Kernel names as an H200 profile of the R4 step showed them (f080127), and fastmavil's
    own Triton kernels by name, each sorted into one category."""
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention",
        "fmha_cutlassB_bf16_aligned_64x64_k32_sm80(PyTorchMemEffAttention)": "attention",
        "_window_backward_kernel": "attention", "_attention_dkdv_kernel": "attention",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "triton_poi_fused_gelu_gelu_backward_view_4": "Triton (torch.compile)",
        "_diffuse_kernel": "Triton (fastmavil)", "_gather_kernel": "Triton (fastmavil)",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel": "LayerNorm",
        "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16>>": "reduction",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>":
            "copy, cast, fill",
        "Memcpy DtoD (Device -> Device)": "copy, cast, fill",
        "void at::native::vectorized_elementwise_kernel<8, at::native::GeluBackward>":
            "other elementwise",
        "ncclDevKernel_AllReduce": "other",
    }
    project = bench._report.project_kernels()
    assert {"_patch_gather_kernel", "_window_forward_kernel", "_mse_fwd_kernel"} <= set(project)
    for name, category in names.items():
        assert bench._report.kernel_category(name, project) == category, name
    rows = [types.SimpleNamespace(key=name, self_device_time_total=1000.0 * (i + 1), count=2)
            for i, name in enumerate(names)]
    summary = bench._report.time_by_category(rows, steps=2)  # row i: i ms over 2 steps
    assert summary[0] == ("copy, cast, fill", 13.5, 2.0)  # longest first
    by_category = {c: (ms, n) for c, ms, n in summary}
    assert by_category["attention"] == (5.0, 4.0) and by_category["matmul"] == (5.5, 2.0)
    assert len(summary) == len(set(names.values()))


def test_kernels_keeps_the_rows_of_a_run_cut_short(results, monkeypatch):
    """gpu_check.sh runs bench.kernels under a time limit: what was measured before the kill
    is in the CSV already."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    path = results / f"kernels-{name.replace(' ', '_')}.csv"
    real, calls = bench.kernels._time, []

    def time_until_killed(*args):
        if len(calls) == 4:
            raise KeyboardInterrupt  # what the stage's timeout amounts to, mid-run
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(bench.kernels, "_time", time_until_killed)
    with pytest.raises(KeyboardInterrupt):
        bench.kernels.main(["--modalities", "audio", "--ratios", "0.9", "--reps", "1"])
    header, *rows = list(csv.reader(path.open()))
    per_mode = 2 if torch.cuda.is_available() else 1  # providers
    assert header == bench.kernels.HEADER and len(rows) == 4 // per_mode * per_mode


def test_compare_halves_the_batch_while_out_of_memory(monkeypatch):
    batches = []

    def compare_at(path, cfg, device, args, peak, batch):
        batches.append(batch)
        if batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return {"batch": batch}

    monkeypatch.setattr(bench.throughput, "_compare", compare_at)
    args = types.SimpleNamespace(batch=8)
    record = bench.throughput.compare("r1", None, torch.device("cpu"), args, None)
    assert batches == [8, 4, 2] and record == {"batch": 2}


def test_throughput_views_alone_timed_round_robin_and_saved_after_each_repeat(results,
                                                                             monkeypatch):
    saved, timed = [], []
    write_text = type(results).write_text

    def record_write(path, text, *a, **k):  # every record the run writes, in order
        name = path.name.removesuffix(".tmp")  # .json.tmp: written, then renamed to .json
        if name.endswith(".json"):
            saved.append((name, json.loads(text)))
        return write_text(path, text, *a, **k)

    def time(trainer, audio, video, ratio, steps):
        timed.append((trainer, len(audio), ratio))
        return 1.0 + len(timed)

    monkeypatch.setattr(type(results), "write_text", record_write)
    monkeypatch.setattr(bench.throughput.Trainer, "time", time)
    assert bench.throughput.main(["configs/r1.toml", "configs/r4.toml", "--size", "tiny",
                                  "--steps", "1", "--repeats", "2", "--warmup", "1",
                                  "--no-compare"]) == 0
    # its own file, not the default record's; no comparison; both views after every repeat
    (name,) = {name for name, _ in saved}
    assert name.startswith("throughput-") and name.endswith("-tiny-views.json")
    assert all(record["configs"] == [] for _, record in saved)
    assert [[v["repeats"] for v in record["curriculum"].values()] for _, record in saved] == [
        [1, 1], [2, 2], [2, 2]]
    final = saved[-1][1]["curriculum"]
    assert final["r4"]["relative_to_r1"] == pytest.approx(final["r4"]["mean_epoch_s"]
                                                          / final["r1"]["mean_epoch_s"])
    # each repeat visits R1's shape and then every R4 shape: one round robin, not view by view
    shapes = 1 + final["r4"]["shapes"]
    first, second = timed[:shapes], timed[shapes:]
    assert len(timed) == 2 * shapes and [t[1:] for t in first] == [t[1:] for t in second]
    assert len({t[0] for t in first}) == 2
    # a B0 other than the default names its own record
    saved.clear()
    assert bench.throughput.main(["configs/r4.toml", "--size", "tiny", "--steps", "1",
                                  "--repeats", "1", "--warmup", "1", "--no-compare",
                                  "--batch", "4"]) == 0
    assert {name for name, _ in saved} == {name.replace("-tiny-", "-tiny-b4-")}


def test_throughput_sets_the_fast_paths_attention_backend(results, monkeypatch):
    """--attention triton gives the fast path's attention modules backend triton (the reference
    keeps math) and names its own record; on a CPU, with the kernels off there, they run auto's
    choice."""
    backends = []
    real = bench.throughput.set_attention_backend
    monkeypatch.setattr(bench.throughput, "set_attention_backend",
                        lambda model, name: backends.append(name) or real(model, name))
    assert bench.throughput.main(["configs/r4.toml", "--size", "tiny", "--steps", "1",
                                  "--repeats", "1", "--warmup", "1", "--no-curriculum",
                                  "--attention", "triton"]) == 0
    assert backends == ["math", "triton"]
    (path,) = results.glob("throughput-*-tiny-triton.json")
    assert json.loads(path.read_text())["args"]["attention"] == "triton"


def test_throughput_writes_to_the_results_folder_given(results, tmp_path):
    elsewhere = tmp_path / "quick" / "check"
    assert bench.throughput.main(["configs/r4.toml", "--size", "tiny", "--steps", "1",
                                  "--repeats", "1", "--warmup", "1", "--no-curriculum",
                                  "--results", str(elsewhere)]) == 0
    (path,) = elsewhere.glob("throughput-*-tiny.json")
    assert json.loads(path.read_text())["args"]["results"] == str(elsewhere)
    assert not list(results.glob("throughput-*"))  # the default folder untouched


@pytest.mark.parametrize("module, argv, message", [
    (bench.throughput, ["configs/nope.toml"], "configs/nope.toml: no such config file"),
    (bench.throughput, ["configs/finetune/demo.toml", "--size", "tiny"],
     "run this config with fastmavil-finetune"),
    (bench.throughput, ["--repeats", "0"], "argument --repeats: '0' is not an integer >= 1"),
    (bench.throughput, ["--steps", "0"], "argument --steps: '0' is not an integer >= 1"),
    (bench.throughput, ["--warmup", "0"], "--warmup: '0' is not an integer >= 1"),
    (bench.throughput, ["configs/r4.toml", "--size", "tiny", "--clips", "100"],
     "--clips 100, configs/r4.toml: "),
    (bench.attention, ["configs/nope.toml"], "no such config file"),
    (bench.attention, ["--batch", "0"], "argument --batch: '0' is not an integer >= 1"),
    (bench.train, ["configs/nope.toml"], "no such config file"),
    (bench.kernels, ["--reps", "x"], "argument --reps: 'x' is not an integer >= 1"),
])
def test_benches_refuse_bad_arguments_in_one_line(capsys, module, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_throughput_refuses_to_measure_nothing():
    with pytest.raises(SystemExit):
        bench.throughput.main(["--no-compare", "--no-curriculum"])


def test_throughput_compile_mode_needs_compile(capsys):
    with pytest.raises(SystemExit):
        bench.throughput.main(["--compile-mode", "max-autotune", "--size", "tiny"])
    assert "--compile-mode needs --compile" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the refusal where the kernels cannot run (no CUDA)")
def test_throughput_max_autotune_needs_the_kernels():
    with pytest.raises(SystemExit, match="max-autotune .* needs the Triton kernels"):
        bench.throughput.main(["configs/r4.toml", "--size", "tiny", "--compile", "--compile-mode",
                               "max-autotune", "--no-curriculum", "--steps", "1"])


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the refusal on a machine without CUDA")
def test_throughput_cuda_graph_needs_cuda(capsys):
    with pytest.raises(SystemExit):
        bench.throughput.main(["--cuda-graph", "--size", "tiny"])
    assert "--cuda-graph needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the refusal on a machine without CUDA")
def test_throughput_bf16_residual_needs_cuda(capsys):
    with pytest.raises(SystemExit):
        bench.throughput.main(["--residual", "bf16", "--size", "tiny"])
    assert "--residual bf16 needs a CUDA GPU" in capsys.readouterr().err


def test_train_runs_the_trainer_per_variant_and_records_its_metrics(results):
    """On a CPU: eager only (the trainer refuses CUDA graphs there), in 1 pass of 4 and in 2
    passes of 2, each run in its own process on random clips."""
    assert bench.train.main(["--size", "tiny", "--batch", "4", "--micro", "2",
                             "--steps", "4"]) == 0
    (path,) = results.glob("train-*-tiny-b4-m2.json")  # options off their defaults named
    record = json.loads(path.read_text())
    assert set(record["variants"]) == {"eager, 1 pass of 4", "eager, 2 passes of 2"}
    for r in record["variants"].values():
        assert r["intervals"] == 3 and r["step_ms"] > 0 and r["samples_per_s"] > 0
        assert r["mfu"] > 0 and r["peak_memory_gb"] > 0
    # graphed first, passes of 8 (the paper's) first: a time limit cuts the least telling ones
    assert list(bench.train.variants(32, 8, cuda=True, compile_blocks=True)) == [
        "compiled + CUDA graphs, 4 passes of 8", "CUDA graphs, 4 passes of 8",
        "compiled + CUDA graphs, 1 pass of 32", "CUDA graphs, 1 pass of 32",
        "eager, 4 passes of 8", "eager, 1 pass of 32"]
    assert list(bench.train.variants(32, 8, cuda=True, compile_blocks=True,
                                     kinds=("compiled",))) == [
        "compiled + CUDA graphs, 4 passes of 8", "compiled + CUDA graphs, 1 pass of 32"]
    assert list(bench.train.variants(32, 32, cuda=False, compile_blocks=True,
                                     kinds=("compiled", "eager"))) == ["eager, 1 pass of 32"]


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the refusals on a machine without CUDA")
def test_train_refuses_what_cannot_run_here(capsys):
    for argv, says in ((["--residual", "bf16"], "--residual bf16 needs a CUDA GPU"),
                       (["--compile", "--kinds", "compiled", "graphs"], "nothing to run here")):
        with pytest.raises(SystemExit):
            bench.train.main(["--size", "tiny", *argv])
        assert says in capsys.readouterr().err


def test_gpu_check_runs_the_named_stages_in_order(tmp_path):
    """bench/gpu_check.sh maps stage and group names to commands (run here with a stand-in
    python that records its arguments) and rejects an unknown name before running anything."""
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls"
    (fake / "python").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    (fake / "python").chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"},
           "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}

    def run(*names):
        calls.write_text("")
        done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *names], env=env,
                              text=True, capture_output=True)
        stages = [line for line in calls.read_text().splitlines() if line.startswith("-m ")]
        return done, stages  # the other calls: version and xdist probes, the summary

    done, stages = run("extra")
    assert done.returncode == 0, done.stderr
    assert [s.split()[1] for s in stages] == ["pytest", "bench.kernels", "bench.kernels",
                                              "bench.throughput", "bench.throughput",
                                              "bench.attention"]
    assert "--dtype" not in stages[1] and "--dtype amp" in stages[2]
    assert "--cuda-graph" in stages[3] and "--compile" in stages[3] and "r4.toml" in stages[3]
    assert "--profile" in stages[4] and "--cuda-graph" in stages[4] and "--compile" in stages[4]
    done, stages = run("extra2")
    assert [s.split()[1] for s in stages] == ["bench.throughput", "bench.train",
                                              "bench.attention"]
    assert "--cuda-graph" in stages[0] and "--compile" not in stages[0]
    assert "--compare-first" in stages[0] and stages[0].index("r4.toml") < stages[0].index("r1")
    assert "--batch-rule flops --passes fit" in stages[0]
    done, stages = run()  # default: the check
    assert [s.split()[1] for s in stages] == ["pytest", "bench.kernels", "bench.throughput"]
    assert "--compile" not in stages[2] and "--size base" in stages[2]
    done, stages = run("mfu")  # the kernel's step beside auto's first, then max-autotune
    assert [s.split()[1] for s in stages] == ["pytest"] + ["bench.throughput"] * 3 + \
        ["bench.attention", "bench.train"]
    assert "tests/kernels/test_attention_kernel.py" in stages[0]
    assert "test_model_step.py -k not test_model_step or triton" in stages[0]
    assert "--attention" not in stages[1] and "--compile-mode" not in stages[1]
    assert "--attention triton" in stages[2] and "--compile-mode" not in stages[2]
    assert "--compile-mode max-autotune" in stages[3] and "--attention" not in stages[3]
    assert all("--compile " in s and "--cuda-graph" in s for s in stages[1:4])
    assert all("--residual bf16" in s for s in stages[1:4] + stages[5:])
    assert "--batch 64 --micro 32 --compile --kinds compiled" in stages[5]
    done, stages = run("residual")
    assert len(stages) == 1 and "--residual bf16" in stages[0] and "--compile " in stages[0]
    done, stages = run("views", "amp")
    assert done.returncode == 0 and len(stages) == 2
    assert "--batch-rule flops --passes fit" in stages[0] and "--dtype amp" in stages[1]
    done, modules = run("tests", "bogus")
    assert done.returncode == 2 and "unknown stage 'bogus'" in done.stderr and modules == []


def test_gpu_check_returns_inductors_autotune_timings(tmp_path):
    """The timings Inductor's max-autotune writes under $TORCHINDUCTOR_CACHE_DIR/cache (a stand-in
    python writes one here) come back in $OUT/autotune-cache.tar after the stage, so the next
    call can carry them and time only new shapes."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\ncase "$*" in *bench.throughput*)\n'
                                 '  mkdir -p "$TORCHINDUCTOR_CACHE_DIR/cache"\n'
                                 '  echo "{}" > "$TORCHINDUCTOR_CACHE_DIR/cache/system";;\nesac\n')
    (fake / "python").chmod(0o755)
    out, cache = tmp_path / "out", tmp_path / "inductor"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out),
           "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "autotune"], env=env,
                          text=True, capture_output=True)
    assert done.returncode == 0, done.stderr
    with tarfile.open(out / "autotune-cache.tar") as tar:
        assert tar.getnames() == ["cache", "cache/system"]


def test_gpu_check_runs_every_cuda_only_test():
    """Each test module with a test that skips without CUDA is in the `tests` stage: on this
    machine they never run, so the GPU check is their only chance."""
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    stage = script[script.index("    tests) run"):].split(";;")[0]
    marker = re.compile(r'reason=f?"needs (a CUDA GPU|two CUDA devices)')
    cuda_only = {path.relative_to(ROOT).as_posix() for path in (ROOT / "tests").rglob("test_*.py")
                 if marker.search(path.read_text())}
    assert cuda_only, "no CUDA-only test found: the marker text changed"
    # left out on purpose: the lent GPU image has no DALI (GUIDE), so the GPU DALI test would
    # skip there too
    left_out = {"tests/data/test_dali_loader.py"}
    assert left_out <= cuda_only, "a left-out module no longer has a CUDA-only test"
    paths = [word.rstrip("/") for word in stage.split() if word.startswith("tests/")]
    missing = {p for p in cuda_only - left_out
               if not any(p == s or p.startswith(s + "/") for s in paths)}
    assert not missing, f"CUDA-only tests the GPU check does not run: {sorted(missing)}"


def test_gpu_check_packs_its_records_and_keeps_to_its_budget(tmp_path):
    """This run's records come back as one tar beside the log (the device tool returns at most
    8 files); a stage the run's budget cannot fit is skipped, and the summary still prints."""
    tree = tmp_path / "tree"
    (tree / "bench" / "results").mkdir(parents=True)
    (tree / "bench" / "gpu_check.sh").write_text((ROOT / "bench" / "gpu_check.sh").read_text())
    (tree / "bench" / "results" / "kernels-old.csv").write_text("an earlier run's\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\n[ "$2" = bench.kernels ] && '
                                 'echo row > bench/results/kernels-new.csv\nexit 0\n')
    (fake / "python").chmod(0o755)
    out = tmp_path / "out"
    # Inductor's cache is the tree's (an in-process compile may have set the variable)
    env = {**{k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"},
           "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out)}

    def run(*stages, budget="560"):
        return subprocess.run(["bash", str(tree / "bench" / "gpu_check.sh"), *stages],
                              env={**env, "GPU_CHECK_BUDGET": budget}, text=True,
                              capture_output=True)

    assert run("tests").returncode == 0 and not (out / "results.tar").exists()  # no record
    done = run("kernels")
    assert done.returncode == 0, done.stderr
    with tarfile.open(out / "results.tar") as tar:
        assert tar.getnames() == ["./kernels-new.csv"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "results.tar"]
    done = run("kernels", "amp", budget="10")
    log = (out / "gpu_check.log").read_text()
    assert "=== bench.kernels: skipped, " in log
    assert "skipped (budget)" in log.split("=== summary")[1]


def test_spread_is_the_largest_distance_from_the_mean():
    assert bench.throughput.spread([1.0, 1.0, 1.0, 2.0]) == pytest.approx(0.75 / 1.25)
    assert bench.throughput.spread([3.0, 3.0]) == 0.0


def test_compare_alternates_which_path_is_timed_first(monkeypatch):
    order = []

    def time(trainer, audio, video, ratio, steps):
        order.append("fast" if trainer.optimizer.defaults.get("fused") else "reference")
        return 1.0
    monkeypatch.setattr(bench.throughput.Trainer, "time", time)
    cfg = bench.throughput.load_config(ROOT / "configs/r4.toml", {"model.size": "tiny"})
    args = types.SimpleNamespace(batch=2, warmup=0, repeats=3, steps=1, compile=False,
                                 compile_mode="default", cuda_graph=False, residual="fp32",
                                 attention="auto")
    record = bench.throughput.compare("r4", cfg, torch.device("cpu"), args, None)
    assert order == ["reference", "fast", "fast", "reference", "reference", "fast"]
    assert record["speedup"] == 1.0


@pytest.mark.parametrize("micro, passes, multiple",
                         [(8, "fixed", 4), (32, "fixed", 1), (0, "fixed", 1), (8, "fit", 4)])
def test_curriculum_times_the_configs_passes_scaled(monkeypatch, micro, passes, multiple):
    """At B0 = 32 the view times each epoch's pass scaled from the config's B0, in the steps
    the config's passes grow in: r4.toml's passes of 8 by whole samples (4 in 32), passes of 32
    by 1, one pass of 2048 in multiples of 8 (1 in 32 after scaling). A step is that pass
    times the epoch's passes over B0's: with passes fitted to B_e that keeps the FLOPs per step
    within +-0.5 %, where 256 passes in every epoch leave them more than +-2 % (the tiny model's
    FLOPs; +-4.5 % at paper size). Each shape's batch is a slice of one batch of the largest."""
    monkeypatch.setattr(bench.throughput, "Trainer", lambda *args, **kwargs: None)
    monkeypatch.setattr(bench.throughput, "batch_for",
                        lambda cfg, batch, device: (torch.arange(batch), None))
    cfg = bench.throughput.load_config(ROOT / "configs/r4.toml", {
        "model.size": "tiny", "train.micro_batch_size": micro, "train.passes_per_step": passes,
        "train.adaptive_batch_rule": "flops"})
    args = types.SimpleNamespace(batch=32, clips=100_000, compile=False, cuda_graph=False,
                                 compile_mode="default", residual="fp32", attention="auto")
    run = bench.throughput._schedule("r4", cfg, torch.device("cpu"), args)
    batches = {b for _, b in run["keys"]}
    assert min(batches) == 32 and all(b % multiple == 0 for b in batches)
    assert any(b % (2 * multiple) for b in batches)  # not coarser than it must be
    assert all(run["batches"][b][0].equal(torch.arange(b)) for b in batches)
    for key in run["keys"]:  # every pass as fast per sample: step time follows the samples
        run["times"][key] = [key[1] * 1.0]
    view = bench.throughput._view(run)
    fitted = passes == "fit" and micro > 0
    assert view["passes_per_step"] == ("fit" if fitted else "fixed")
    assert (len({e["passes"] for e in view["epochs"]}) > 1) == fitted
    if micro == 8:  # rounding to whole passes of 8 at B0 = 2048, or fitting them
        assert view["flops_spread"] < 0.005 if fitted else view["flops_spread"] > 0.02
