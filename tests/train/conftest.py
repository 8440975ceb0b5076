import pytest

from fastmavil.data.synth import SynthSpec, synthesize


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 clips of 1 s in 3 shards of 8 (under 2 processes, rank 0 reads two, rank 1 one)."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, clips=24, heldout=0.0, clips_per_shard=8, workers=1,
               spec=SynthSpec(seconds=1.0, size=48, fps=8.0))
    return out / "train"
