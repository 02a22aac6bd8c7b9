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


def _planted_outlier_problem():
    """A small MLP whose first layer holds three planted tail weights (flat indices 0, 1, 2), and data."""
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        net[0].weight[0, :3] = torch.tensor([4.0, -5.0, 6.0])
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return net, x, y


@pytest.fixture(scope="session")
def planted_outlier_problem():
    """Builder of the planted-outlier problem, shared by the analysis tests."""
    return _planted_outlier_problem
