"""Our last-layer Laplace against ``laplace-torch`` on the pretrained ccexam CNN (issue 38, item 2).

    make venv-laplace        # laplace-torch 0.3 beside torch 2.13 in assets/venv-laplace (without torchvision)
    python benchmarks/laplace_reference.py --reference-python assets/venv-laplace/bin/python

``laplace-torch`` pulls a torchvision wheel that does not load with torch 2.13, so it lives in its own
venv, without torchvision, and runs here in a subprocess on the same network and images: the ccexam
CNN rebuilt as a plain ``nn.Sequential`` (its state dict), the GGN summed over ``--train`` MNIST
training images, ``Laplace(net, "classification", subset_of_weights="last_layer",
hessian_structure="full")``, the probit predictive on ``--val`` validation images at prior precision 1,
then ``optimize_prior_precision(method="gridsearch")`` on them. Prints the largest differences.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn


def ccexam_sequential() -> nn.Sequential:
    """The ccexam MNIST CNN's layers as one ``nn.Sequential`` (state-dict keys ``0.weight`` ...)."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def reference(path: Path) -> None:
    """laplace-torch's numbers for the problem saved at ``path`` (run inside its venv)."""
    from laplace import Laplace

    problem = torch.load(path)
    net = ccexam_sequential()
    net.load_state_dict(problem["state"])
    net.eval()
    def loader(x: torch.Tensor, y: torch.Tensor) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=500)

    la = Laplace(net, "classification", subset_of_weights="last_layer", hessian_structure="full", prior_precision=1.0)
    la.fit(loader(problem["x"], problem["y"]))
    covariance = la.posterior_covariance.detach().clone()
    probs = la(problem["xv"], pred_type="glm", link_approx="probit").detach()
    la.optimize_prior_precision(pred_type="glm", method="gridsearch", val_loader=loader(problem["xv"], problem["yv"]),
                                link_approx="probit")
    torch.save({"covariance": covariance, "probs": probs, "prior_precision": float(la.prior_precision)}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-python", type=Path, help="the python of the laplace-torch venv")
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--val", type=int, default=2000)
    parser.add_argument("--reference-of", type=Path, help=argparse.SUPPRESS)  # the subprocess's mode
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.reference_of:
        reference(args.reference_of)
        return
    if args.reference_python is None or not args.reference_python.exists():
        raise SystemExit("error: --reference-python must name the python of a venv with laplace-torch "
                         "(make venv-laplace: assets/venv-laplace/bin/python)")
    from sqs_pyro.data import load_mnist, load_mnist_cnn
    from sqs_pyro.data.uncertainty import PRIOR_PRECISIONS, LastLayerLaplace

    net = ccexam_sequential()
    net.load_state_dict(dict(zip(net.state_dict(), load_mnist_cnn().state_dict().values())))
    net.eval()
    (x, y), (xv, yv) = load_mnist("train", args.train), load_mnist("val", args.val)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "problem.pt"
        torch.save({"state": net.state_dict(), "x": x, "y": y, "xv": xv, "yv": yv}, path)
        subprocess.run([str(args.reference_python), __file__, "--reference-of", str(path)], check=True)
        ref = torch.load(path)
    ours = LastLayerLaplace(net, prior_precision=1.0).fit(x, y)
    classes, width = 10, 129  # laplace-torch orders [W.flatten(), b]; ours the rows of [W b]
    order = [c * width + d for c in range(classes) for d in range(width - 1)] + [c * width + width - 1
                                                                              for c in range(classes)]
    covariance = ours.posterior_covariance()[order][:, order]
    scale = float(ref["covariance"].abs().max())
    gap = float((covariance - ref["covariance"]).abs().max())
    print(f"posterior covariance: max |ours - laplace-torch| = {gap:.3g} (max |entry| {scale:.3g})")
    print(f"probit predictive: max |ours - laplace-torch| = "
          f"{float((ours(xv) - ref['probs'].double()).abs().max()):.3g}")
    nll = ours.validation_nll(xv, yv)
    running = torch.cumsum(nll, 0) / torch.arange(1, len(nll) + 1)  # a metric never reset between grid points
    print(f"tuned prior precision: ours {ours.tune_prior_precision(xv, yv):.6g}, laplace-torch "
          f"{ref['prior_precision']:.6g}; ours by laplace-torch 0.3's rule (its RunningNLLMetric is not reset "
          f"between grid points: the argmin of the running mean) {PRIOR_PRECISIONS[int(torch.argmin(running))]:.6g}")


if __name__ == "__main__":
    sys.exit(main())
