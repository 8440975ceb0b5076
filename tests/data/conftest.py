import pytest

# The fixtures import the clip makers when used: the GPU check runs tests/data/test_fbank.py on
# an image without PyAV or soundfile, and this file is loaded for every test in the folder.


@pytest.fixture(scope="module")
def bad_shard(tmp_path_factory):
    from .clips import bad_clips_shard
    return bad_clips_shard(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    from .clips import write_dataset
    folder = tmp_path_factory.mktemp("ds")
    write_dataset(folder, 12, 3)
    return folder
