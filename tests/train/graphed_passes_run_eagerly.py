"""fastmavil-train with `train.cuda_graphs` on a CPU: the graphed passes run eagerly instead of
being captured (torchrun ... tests/train/graphed_passes_run_eagerly.py CONFIG [overrides]).

A stand-in for the capture, so that the graphed path's multi-process wiring (rank 0's parameters
broadcast in place of DistributedDataParallel's, each rank's share of the passes, the gradient
buffers averaged once a step) runs without a GPU; the capture itself is tested on CUDA
(tests/kernels/test_model_step.py)."""
import dataclasses
import sys
from unittest import mock

from fastmavil import cuda_graph
from fastmavil.train import pretrain


class EagerPasses(cuda_graph.GraphedPasses):
    """GraphedPasses (its gradient buffers, its averaging) with every call run eagerly."""

    def __init__(self, model, generator, autocast_dtype=None):
        with mock.patch.object(cuda_graph._Replayer, "__init__", lambda *args: None):
            super().__init__(model, generator, autocast_dtype)  # no CUDA device check
        self.generator = generator

    def run(self, fn, tensors, key, before=lambda: None):
        before()
        return fn(*tensors)

    def pool_idle_bytes(self):
        return None


def setup_runtime(t, *args):
    """setup_runtime (as pretrain.py calls it), which refuses train.cuda_graphs on a CPU,
    letting it through."""
    return real_setup_runtime(dataclasses.replace(t, cuda_graphs=False), *args)


real_setup_runtime = pretrain.setup_runtime

if __name__ == "__main__":
    pretrain.GraphedPasses, pretrain.setup_runtime = EagerPasses, setup_runtime
    sys.exit(pretrain.main())
