import pytest

from .clips import bad_clips_shard, write_dataset


@pytest.fixture(scope="module")
def bad_shard(tmp_path_factory):
    return bad_clips_shard(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds")
    write_dataset(folder, 12, 3)
    return folder
