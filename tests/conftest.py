"""Shared fixtures: one smoke-preset pre-training per test session, in a temporary artifacts folder."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU contended threads stall for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_cfg(tmp_path_factory):
    from cfmoe.config import load_config

    os.environ["CFMOE_ARTIFACTS"] = str(tmp_path_factory.mktemp("artifacts"))
    os.environ["CFMOE_RESULTS"] = str(tmp_path_factory.mktemp("results"))
    return load_config("smoke")


@pytest.fixture(scope="session")
def smoke_model_dir(smoke_cfg):
    from cfmoe import model

    return model.pretrain(smoke_cfg, model.base_model_dir(smoke_cfg))
