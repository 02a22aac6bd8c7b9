import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These 2-vCPU machines run small nets fastest (and reproducibly) on one thread."""
    torch.set_num_threads(1)
    pyro.clear_param_store()  # plain-Pyro tests use the global parameter store
    yield
    pyro.clear_param_store()
