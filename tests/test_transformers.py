"""Transformers as inputs: layer presets, the LM likelihood, perplexity, text readers."""
import math

import pytest
import torch
from pyro import poutine
from torch import nn

from sqs_pyro import SQSInputError
from sqs_pyro.hf import CausalLM, SentenceClassifier, perplexity, token_windows
from sqs_pyro.models import TokenCategoricalLikelihood, select_layers, transformer_include

transformers = pytest.importorskip("transformers", reason="transformers not installed")
from tiny_hf import tiny_bert, tiny_llama  # noqa: E402 (after the skip)


def test_bert_preset_selects_attention_and_mlp_only():
    names = [s.name for s in select_layers(tiny_bert(vocab_size=50), include=transformer_include("bert"))]
    assert len(names) == 2 * 6
    assert not any("pooler" in n or "embeddings" in n for n in names)


def test_llama_preset_skips_tied_lm_head_and_embeddings():
    lm = tiny_llama()
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    names = [s.name for s in select_layers(lm, include=transformer_include("llama"))]
    assert len(names) == 2 * 7 and all("lm_head" not in n for n in names)
    with pytest.raises(SQSInputError, match="no layer preset"):
        transformer_include("gpt-unknown")


def test_token_likelihood_scales_by_sequences():
    lik = TokenCategoricalLikelihood(num_data=10)
    logits, y = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    tr = poutine.trace(lambda: lik(logits, y)).get_trace()
    tr.compute_log_prob()
    expected = 10 / 2 * torch.distributions.Categorical(logits=logits).log_prob(y).sum()
    assert tr.nodes["obs"]["scale"] == 5.0
    torch.testing.assert_close(tr.nodes["obs"]["log_prob_sum"], expected)  # already scaled by N/B


def test_token_categorical_matches_categorical_and_saves_no_vocabulary_sized_copy():
    """Log-probabilities and their gradients equal ``Categorical``'s (in float64, over more rows than one
    chunk); the backward pass keeps the logits themselves and nothing else vocabulary-sized (negative
    control: ``Categorical`` keeps such a copy)."""
    from sqs_pyro.models.likelihoods import TokenCategorical

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 200, 11, generator=g, dtype=torch.float64)).requires_grad_(True)
    y, weights = torch.randint(0, 11, (3, 200), generator=g), torch.randn(3, 200, generator=g, dtype=torch.float64)
    grads, copies = [], []
    for make in (TokenCategorical, lambda t: torch.distributions.Categorical(logits=t)):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp = make(logits).log_prob(y)
        grads.append(torch.autograd.grad((lp * weights).sum(), logits)[0])
        copies.append(sum(t.numel() >= logits.numel() and t.untyped_storage().data_ptr()
                          != logits.untyped_storage().data_ptr() for t in saved))
        if len(grads) == 1:
            mine = lp.detach()
    torch.testing.assert_close(mine, torch.distributions.Categorical(logits=logits).log_prob(y).detach())
    torch.testing.assert_close(grads[0], grads[1])
    assert copies[0] == 0 and copies[1] >= 1
    assert torch.autograd.gradcheck(lambda t: TokenCategorical(t).log_prob(y[:1, :4]), (logits[:1, :4].detach()
                                    .clone().requires_grad_(True),))


def test_perplexity_of_uniform_predictions_is_the_vocabulary_size():
    class Uniform(nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, 13)

    windows = torch.randint(0, 13, (5, 9))
    assert perplexity(Uniform(), windows, batch_size=2) == pytest.approx(13.0)


def test_causal_lm_wrapper_and_windows():
    lm = CausalLM(tiny_llama())
    ids = torch.randint(0, 40, (3, 8))
    assert lm(ids).shape == (3, 8, 40)

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 40 for c in text]}

    w = token_windows(Tok(), "abcdefghijklmnopqrstuvwxyz", length=8, stride=4)
    assert w.shape == (5, 9) and torch.equal(w[1, :5], w[0, 4:9])
    assert math.isfinite(perplexity(lm, w))


def test_sentence_classifier_mean_pools_only_unmasked_tokens():
    net = SentenceClassifier(tiny_bert(vocab_size=50), 3).eval()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    x = torch.stack([ids, mask], 1)
    emb = net.embed(x)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    x2 = x.clone()
    x2[0, 0, 3:] = 7  # padding tokens change, the mask hides them ... but attention masking also hides them
    torch.testing.assert_close(net.embed(x2)[0], emb[0], atol=1e-5, rtol=1e-5)
    assert net(x).shape == (2, 3)


def test_compress_a_tiny_llama_as_a_language_model():
    from sqs_pyro import SQSConfig
    from sqs_pyro.infer import compress

    lm = CausalLM(tiny_llama())
    gen = torch.Generator().manual_seed(0)
    # a deterministic "language": each token is the previous one plus 1 (mod 40)
    start = torch.randint(0, 40, (64, 1), generator=gen)
    tokens = (start + torch.arange(13)) % 40
    x, y = tokens[:, :-1], tokens[:, 1:]
    config = SQSConfig(components=4, sparsity=0.5, epochs=2, batch_size=16, include=transformer_include("llama"))
    before = perplexity(lm, tokens)
    result = compress(lm, (x, y), config, task="lm", progress=False)
    acc = result.accounting()
    assert len(result.compressed().layers) == 14 and 0.5 <= acc["sparsity"] < 1 and acc["bits"] == 2
    compressed = result.greedy_module()
    assert math.isfinite(perplexity(compressed, tokens)) and before > 1
    with pytest.raises(SQSInputError, match="labels out of range"):
        compress(lm, (x, y + 40), config, task="lm", progress=False)
