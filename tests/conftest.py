import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def single_process_group():
    """A world-1 gloo group, as a one-rank DeepSpeed launch would have, so MoE layers run in the test process."""
    import deepspeed
    import torch.distributed as dist
    if not dist.is_initialized():
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
               "LOCAL_RANK": "0"}
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            deepspeed.init_distributed(dist_backend="gloo")
        finally:  # tests that launch ranks hand os.environ on to them
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
