"""`sqs-pyro export FILE --torch / --safetensors / --onnx`: dense files that load in a fresh process that never
imports sqs_pyro, with the outputs of `load_compressed`; ONNX checked with onnxruntime against torch."""
import subprocess
import sys
import textwrap

import pytest
import torch

from sqs_pyro import SQSConfig, compress, load_compressed, save_compressed
from sqs_pyro.cli import main

ARCH = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                             nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Flatten(), nn.Linear(6 * 6 * 6, 3))

    def data():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(96, 1, 6, 6, generator=g)
        return x, (x.mean((1, 2, 3)) > 0).long()
''')


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A tiny BN + depthwise network compressed to 50% / K=4, its file, and held-out inputs."""
    root = tmp_path_factory.mktemp("dense_export")
    (root / "arch.py").write_text(ARCH)
    sys.path.insert(0, str(root))
    try:
        import arch
    finally:
        sys.path.remove(str(root))
    net = arch.build()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)  # statistics that must survive the export
    result = compress(net.train(), arch.data(), SQSConfig(epochs=1, batch_size=32, components=4, sparsity=0.5),
                      progress=False)
    save_compressed(result, root / "model.sqs")
    x = torch.randn(7, 1, 6, 6)
    torch.save(x, root / "x.pt")
    with torch.no_grad():
        expected = load_compressed(root / "model.sqs", arch.build()).eval()(x)
    yield root, x, expected
    sys.modules.pop("arch", None)


FRESH = textwrap.dedent('''
    import sys, torch
    from arch import build
    net = build()
    if sys.argv[1] == "torch":
        state = torch.load(sys.argv[2], weights_only=True)
    else:
        from safetensors.torch import load_file
        state = load_file(sys.argv[2])
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.save(net.eval()(torch.load("x.pt")), "out.pt")
    assert not any(m.startswith("sqs_pyro") for m in sys.modules), "sqs_pyro was imported"
''')


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_dense_files_load_without_sqs_pyro(compressed, fmt, capsys):
    root, x, expected = compressed
    out = root / f"dense.{fmt}"
    assert main(["export", str(root / "model.sqs"), f"--{fmt}", str(out)]) == 0
    assert "decoding" in capsys.readouterr().err  # stage lines, unless --no-progress
    proc = subprocess.run([sys.executable, "-c", FRESH, fmt, str(out)], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch.load(root / "out.pt"), expected)
    assert main(["export", str(root / "model.sqs"), f"--{fmt}", str(out)]) == 2  # exists: needs --force
    capsys.readouterr()
    assert main(["export", str(root / "model.sqs"), f"--{fmt}", str(out), "--force", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_onnx_matches_torch(compressed, monkeypatch):
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install 'sqs-pyro[onnx]')")
    pytest.importorskip("onnx")
    root, x, expected = compressed
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    out = root / "model.onnx"
    assert main(["export", "model.sqs", "--onnx", str(out), "--model", "arch:build", "--data", "arch:data"]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]  # 7 rows: a batch size not traced
    assert float((torch.from_numpy(got) - expected).abs().max()) <= 1e-5


def test_onnx_needs_the_architecture(compressed, capsys):
    root, _, _ = compressed
    assert main(["export", str(root / "model.sqs"), "--onnx", str(root / "m.onnx")]) == 2
    assert "--onnx needs --model" in capsys.readouterr().err
