import os

import pytest

GROUP_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(scope="session")
def single_process_group():
    """A world-1 gloo group, as a one-rank DeepSpeed launch would have, so MoE layers run in the test process."""
    import torch.distributed as dist
    from omoe_ds import collectives
    if not dist.is_initialized():
        saved = {key: os.environ.get(key) for key in GROUP_ENV}
        try:
            collectives.init_distributed()
        finally:  # tests that launch ranks hand os.environ on to them
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
