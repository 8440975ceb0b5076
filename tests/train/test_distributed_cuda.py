"""Pre-training in two processes on two GPUs (NCCL): the passes replayed as CUDA graphs, their
gradients averaged by one all-reduce a step, train as DistributedDataParallel's eager passes.
On a CPU the same wiring runs with the graphs' passes eager (test_distributed.py)."""
import json

import pytest
import torch

from .test_distributed import torchrun

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="needs two CUDA devices: NCCL gives each process a GPU of its own")


def test_graphed_passes_on_two_gpus_train_as_distributed_data_parallel(shards, tmp_path):
    common = {"train__device": "cuda", "train__precision": "fp32", "train__max_steps": 6,
              "train__micro_batch_size": 1}  # 4 passes a step, 2 on each GPU
    ddp = torchrun(shards, tmp_path / "ddp", **common)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    graphed = torchrun(shards, tmp_path / "graphed", **common, train__cuda_graphs="true")
    assert graphed.returncode == 0, graphed.stderr[-3000:]
    assert "replayed as CUDA graphs" in graphed.stderr
    seen = {}
    for name in ("ddp", "graphed"):
        lines = (tmp_path / name / "t" / "metrics.jsonl").read_text().splitlines()
        seen[name] = torch.tensor([[r["loss"], r["grad_norm"]] for r in map(json.loads, lines)])
    assert seen["ddp"].shape[0] >= 4
    # the same kernels, eager or replayed, in fp32: a missing average or a wrong share of the
    # passes would double or halve the gradient norm
    torch.testing.assert_close(seen["graphed"], seen["ddp"], rtol=1e-4, atol=1e-5)
