import glob
import os

import pytest

GROUP_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(scope="session")
def single_process_group():
    """A world-1 gloo group, as a one-rank DeepSpeed launch would have, so MoE layers run in the test process."""
    import torch.distributed as dist
    from omoe_ds.core import environment
    if not dist.is_initialized():
        saved = {key: os.environ.get(key) for key in GROUP_ENV}
        try:
            environment.init_distributed()
        finally:  # tests that launch ranks hand os.environ on to them
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# ---- the tiny model and data of the training-job, sweep, resume and export tests
@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    from tiny_job import save_tiny_bert
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """train/dev/test csv files (text, label) of 3 easy classes: 120 / 24 / 24 rows."""
    from tiny_job import write_csv
    path = tmp_path_factory.mktemp("tiny_data")
    words = {"sports": "goal match team", "weather": "rain sun cloud", "money": "bank loan cash"}
    rows = [(f"the {w.split()[i % 3]} today {i}", label) for i in range(40) for label, w in words.items()]
    for name, part in (("train.csv", rows), ("dev.csv", rows[:24]), ("test.csv", rows[24:48])):
        write_csv(path / name, part)
    return str(path)


SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"


@pytest.fixture(autouse=True)
def remove_deepspeed_shm_buffers():
    """DeepSpeed 0.19.8's CPU shm all-reduce leaves a 69 MB /dev/shm file per rank and launch, named by the
    master port; every launch here takes a fresh port, so without this a full run holds gigabytes of RAM."""
    yield from _removing_buffers_created()


@pytest.fixture(scope="session", autouse=True)
def remove_deepspeed_shm_buffers_of_fixtures():
    """The same for launches in module- and session-scoped fixtures, which run before a test's own snapshot
    (measured: a run of tests/test_layouts.py and test_checkpoint.py left 11 files, 0.76 GB)."""
    yield from _removing_buffers_created()


def _removing_buffers_created():
    before = set(glob.glob(SHM_BUFFERS))
    yield
    created = set(glob.glob(SHM_BUFFERS)) - before
    # Only files no live process maps: another suite or job running beside this one may be using its own.
    for path in created - mapped_files(created):
        try:
            os.remove(path)
        except OSError:
            pass


def mapped_files(paths) -> set:
    """Those of `paths` some live process has mapped (/proc/<pid>/maps)."""
    mapped = set()
    if not paths:  # most tests launch nothing: no need to read every process's maps
        return mapped
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                text = f.read()
        except OSError:  # the process ended, or is not ours to read
            continue
        mapped.update(path for path in paths if path in text)
    return mapped
