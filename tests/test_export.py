"""``sqs-pyro export FILE --hf OUT_DIR``: a plain transformers folder that loads without sqs-pyro
and gives the outputs of ``load_transformers(FILE)``; ``--force``; bad input refused up front."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from sqs_pyro import SQSConfig, compress, load_compressed, save_compressed
from sqs_pyro.cli import main
from sqs_pyro.cli.compress_hf import HF_DEFAULTS
from sqs_pyro.hf import CausalLM, SentenceClassifier, load_transformers
from sqs_pyro.hf import export as export_module
from sqs_pyro.models import transformer_include

transformers = pytest.importorskip("transformers", reason="transformers not installed")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors not installed")
from tiny_hf import tiny_bert, tiny_llama, word_tokenizer as _tokenizer  # noqa: E402 (after the skips)
SENTENCE = "w1 w2 w3 w4 w5 w6 w7 w8 w9"


def _hf_config(family: str) -> SQSConfig:
    """``compress --hf``'s defaults at K=4, 50% sparsity (one-shot pruning, attention + MLP preset)."""
    return SQSConfig.from_dict({**HF_DEFAULTS, "sparsity": 0.5, "initial_sparsity": 0.5, "components": 4,
                                "include": transformer_include(family), "include_types": ("linear",)})


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    """A compressed tiny Llama (tied LM head) inside ``CausalLM`` (prefix ``lm``), as compress --hf writes it."""
    net = CausalLM(tiny_llama().eval())
    ids = torch.randint(4, 34, (48, 9))
    result = compress(net, (ids[:, :-1], ids[:, 1:]), _hf_config("llama"), task="lm", progress=False)
    path = tmp_path_factory.mktemp("llama") / "model.sqs"
    save_compressed(result, path, model=net)
    return path


@pytest.fixture(scope="module")
def bert_file(tmp_path_factory):
    """A compressed tiny BERT encoder inside ``SentenceClassifier`` (prefix ``encoder``)."""
    net = SentenceClassifier(tiny_bert().eval(), 2)
    ids = torch.randint(4, 34, (48, 8))
    x = torch.stack([ids, torch.ones_like(ids)], dim=1)  # (N, 2, L): ids and attention mask
    result = compress(net, (x, (ids[:, 0] > 18).long()), _hf_config("bert"), task="classification",
                      progress=False)
    path = tmp_path_factory.mktemp("bert") / "model.sqs"
    save_compressed(result, path, model=net)
    return path


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    """A compressed plain MLP: a valid .sqs file with no transformers model in it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(256, 8)
    result = compress(net, (x, (x[:, 0] > 0).long()), SQSConfig(epochs=1, batch_size=32), progress=False)
    path = tmp_path_factory.mktemp("mlp") / "model.sqs"
    save_compressed(result, path)
    return path


@pytest.fixture(scope="module")
def exported(llama_file, bert_file, tmp_path_factory):
    """Both files exported with the CLI, the Llama with its tokenizer."""
    root = tmp_path_factory.mktemp("exported")
    _tokenizer().save_pretrained(root / "tokenizer")  # tokenizer files only, no config.json
    assert main(["export", str(llama_file), "--hf", str(root / "llama"), "--tokenizer", str(root / "tokenizer")]) == 0
    assert main(["export", str(bert_file), "--hf", str(root / "bert")]) == 0
    return root


def test_the_exported_folders_load_without_sqs_pyro_and_give_the_same_outputs(llama_file, bert_file, exported):
    code = textwrap.dedent(f"""
        import sys
        import torch
        import transformers
        torch.set_num_threads(1)
        llama_dir, bert_dir, out = {str(exported / 'llama')!r}, {str(exported / 'bert')!r}, {str(exported / 'out.pt')!r}
        tok = transformers.AutoTokenizer.from_pretrained(llama_dir, local_files_only=True)
        ids = tok({SENTENCE!r}, return_tensors="pt", add_special_tokens=False)["input_ids"]
        lm = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, local_files_only=True).eval()
        encoder = transformers.AutoModel.from_pretrained(bert_dir, local_files_only=True).eval()
        with torch.no_grad():
            result = {{"ids": ids, "logits": lm(input_ids=ids).logits, "hidden": encoder(input_ids=ids).last_hidden_state,
                      "classes": [type(lm).__name__, type(encoder).__name__],
                      "dtypes": [str(lm.dtype), str(encoder.dtype)],
                      "tied": lm.lm_head.weight is lm.model.embed_tokens.weight,
                      "generate": lm.generate(ids[:, :3], max_new_tokens=4, do_sample=False),
                      "sqs_pyro_imported": any(m.split(".")[0] == "sqs_pyro" for m in sys.modules)}}
        torch.save(result, out)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=exported,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(exported / "out.pt")
    assert got["sqs_pyro_imported"] is False
    assert got["classes"] == ["LlamaForCausalLM", "BertModel"] and got["dtypes"] == ["torch.float32"] * 2
    assert got["tied"] is True  # the tied LM head is tied again by transformers itself
    ids = _tokenizer()(SENTENCE, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert torch.equal(got["ids"], ids)  # the copied tokenizer encodes like the original
    lm, encoder = load_transformers(llama_file), load_transformers(bert_file)
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], lm(input_ids=ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(got["hidden"], encoder(input_ids=ids).last_hidden_state, rtol=0, atol=0)
        assert torch.equal(got["generate"], lm.generate(ids[:, :3], max_new_tokens=4, do_sample=False))


def test_the_safetensors_file_holds_the_dense_decompressed_weights(llama_file, exported):
    out = exported / "llama"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    saved = safetensors_torch.load_file(out / "model.safetensors")
    decompressed = {k[len("lm."):]: v for k, v in load_compressed(llama_file).state_dict().items()}
    assert set(saved) == set(decompressed) - {"lm_head.weight"}  # the tied head is stored once
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, decompressed[name]), name
    q = saved["model.layers.0.self_attn.q_proj.weight"]
    assert (q == 0).float().mean() >= 0.4 and len(torch.unique(q[q != 0])) <= 4  # stored dense, values as decoded


def test_force_replaces_a_non_empty_folder_and_nothing_else(llama_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    assert main(["export", str(llama_file), "--hf", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and os.listdir(out) == ["old.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left beside it
    assert main(["export", str(llama_file), "--hf", str(out), "--force"]) == 0
    assert "old.txt" not in os.listdir(out) and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(llama_file), "--hf", str(empty)]) == 0  # an empty folder needs no --force
    inside = out / "model.sqs"
    inside.write_bytes(llama_file.read_bytes())
    assert main(["export", str(inside), "--hf", str(out), "--force"]) == 2
    assert "holds the input" in capsys.readouterr().err and inside.is_file()
    monkeypatch.chdir(empty)
    assert main(["export", str(llama_file), "--hf", ".", "--force"]) == 2  # would replace the working folder
    assert "current folder" in capsys.readouterr().err and (empty / "config.json").is_file()


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("mlp", "holds no transformers model"),
    ("garbage", "not an sqs-pyro compressed file"),
    ("not-a-folder", "not a folder"),
    ("no-tokenizer", "no such folder"),
    ("bad-tokenizer", "cannot load a tokenizer"),
])
def test_bad_input_exits_2_before_anything_is_written(llama_file, mlp_file, tmp_path, capsys, monkeypatch,
                                                      case, message):
    def must_not_run(path):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(export_module, "load_transformers", must_not_run)
    (tmp_path / "garbage.sqs").write_bytes(b"not an sqs file at all")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty-folder").mkdir()
    files = {"missing": tmp_path / "missing.sqs", "mlp": mlp_file, "garbage": tmp_path / "garbage.sqs"}
    out = tmp_path / ("file" if case == "not-a-folder" else "out")
    tokenizer = {"no-tokenizer": ["--tokenizer", str(tmp_path / "nothing")],
                 "bad-tokenizer": ["--tokenizer", str(tmp_path / "empty-folder")]}.get(case, [])
    before = sorted(os.listdir(tmp_path))
    assert main(["export", str(files.get(case, llama_file)), "--hf", str(out), *tokenizer]) == 2
    assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before


def test_a_failed_write_leaves_the_previous_folder_untouched(llama_file, tmp_path, monkeypatch):
    class Failing(nn.Module):
        def save_pretrained(self, path):
            (path / "config.json").write_text("{}")
            raise OSError("disk full")

    monkeypatch.setattr(export_module, "load_transformers", lambda path: Failing())
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(OSError, match="disk full"):
        export_module.export_transformers(llama_file, out, force=True)
    assert os.listdir(out) == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
