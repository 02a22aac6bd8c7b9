"""A small trained MLP for the sparsity tests: random ReLU features, the head fit by least squares."""
import torch
from torch import nn

g = torch.Generator().manual_seed(0)
X = torch.randn(1024, 16, generator=g)
Y = (X @ torch.randn(16, 4, generator=g)).argmax(1)


def trained_mlp(hidden: int = 64) -> nn.Sequential:
    """``Linear(16, hidden) -> ReLU -> Linear(hidden, 4)`` on :data:`X`: the head is the least-squares fit of
    the one-hot labels on the first 768 examples' features (seeded)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    with torch.no_grad():
        h = torch.relu(net[0](X[:768]))
        sol = torch.linalg.lstsq(torch.cat([h, torch.ones(len(h), 1)], 1),
                                 nn.functional.one_hot(Y[:768], 4).float()).solution
        net[2].weight.copy_(sol[:-1].T)
        net[2].bias.copy_(sol[-1])
    return net
