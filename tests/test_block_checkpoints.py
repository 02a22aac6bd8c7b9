"""Block checkpoints: a transformer's layers run again in the backward pass with the sampled weights they
ran with, so the loss and every gradient are the same bits as without checkpoints."""
import contextlib

import pyro
import pytest
import torch

import sqs_pyro.models.block_checkpoints as block_checkpoints
from sqs_pyro import SQSConfig
from sqs_pyro.errors import SQSInputError
from sqs_pyro.guides import SpikeGMMGuide
from sqs_pyro.hf import CausalLM, SentenceClassifier
from sqs_pyro.infer import compress
from sqs_pyro.infer.elbo import SQSMeanFieldELBO
from sqs_pyro.models import (CategoricalLikelihood, SQSModel, TokenCategoricalLikelihood, select_layers,
                             transformer_include)
from sqs_pyro.models.block_checkpoints import repeated_blocks
from tiny_hf import tiny_bert, tiny_llama


def tiny_sentence_classifier() -> SentenceClassifier:
    return SentenceClassifier(tiny_bert(vocab_size=50), 2).train()  # dropout on: the recomputation replays it


def tiny_causal_lm() -> CausalLM:
    return CausalLM(tiny_llama(layers=3, tied=False))


def test_repeated_blocks_are_the_outermost_module_list_members():
    assert repeated_blocks(tiny_causal_lm()) == ["lm.model.layers.0", "lm.model.layers.1", "lm.model.layers.2"]
    nested = torch.nn.ModuleList([torch.nn.ModuleList([torch.nn.Linear(2, 2)]), torch.nn.Linear(2, 2)])
    assert repeated_blocks(torch.nn.Sequential(nested)) == ["0.0", "0.1"]
    assert repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


def loss_and_grads(group_size: int, checkpointed: bool, mode: str = "sample",
                   family: str = "llama") -> tuple[list[torch.Tensor], int]:
    """One ELBO step's loss and gradients (latent weights, codebooks, gates, group scales, dense
    parameters) of the same seeded draw, and how many times the layers' first parts (attention) started:
    a recomputation stops once it has what the backward pass needs, so a later part may not run again."""
    net = tiny_causal_lm() if family == "llama" else tiny_sentence_classifier()
    include = transformer_include(family)
    sites = select_layers(net, include=include)
    config = SQSConfig(components=4, group_size=group_size, include=include, mode=mode, windows="none")
    gen = torch.Generator().manual_seed(1)
    if family == "llama":
        tokens = torch.randint(0, 40, (4, 9), generator=gen)
        x, y, likelihood = tokens[:, :-1], tokens[:, 1:], TokenCategoricalLikelihood(32)
    else:
        x = torch.stack([torch.randint(0, 50, (4, 7), generator=gen), torch.ones(4, 7, dtype=torch.long)], 1)
        y, likelihood = torch.tensor([0, 1, 1, 0]), CategoricalLikelihood(32)
    with pyro.settings.context(module_local_params=True):
        model = SQSModel(net, sites, config, likelihood, blocks=repeated_blocks(net) if checkpointed else ())
        guide = SpikeGMMGuide(net, sites, config)
        runs = []
        for name in repeated_blocks(net):
            first = next(model.net.get_submodule(name).children())
            first.register_forward_pre_hook(lambda *_: runs.append(None))
        pyro.set_rng_seed(3)
        loss = SQSMeanFieldELBO()(model, guide)(x, y)
        params = [p for p in [*guide.parameters(), *model.parameters()] if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [loss.detach(), *[g for g in grads if g is not None]], len(runs)


@pytest.mark.parametrize("group_size,mode,family", [(8, "sample", "llama"), (8, "hard", "llama"),
                                                    (0, "sample", "llama"), (8, "sample", "bert")])
def test_checkpointed_layers_give_the_same_loss_and_gradients(group_size, mode, family):
    plain, plain_runs = loss_and_grads(group_size, False, mode, family)
    ckpt, ckpt_runs = loss_and_grads(group_size, True, mode, family)
    layers = {"llama": 3, "bert": 2}[family]
    assert plain_runs == layers and ckpt_runs == 2 * layers  # every layer ran again in the backward pass
    assert len(plain) == len(ckpt) > 10
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


def test_a_recomputation_without_the_sampled_weights_fails(monkeypatch):
    """Negative control: a layer recomputed on the placeholders (the weights functional_call had put back)
    saves other tensors than its forward pass did, and the backward pass stops."""
    monkeypatch.setattr(block_checkpoints, "_installed", lambda kept: contextlib.nullcontext())
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different number of tensors"):
        loss_and_grads(8, True)


def test_compress_checks_for_repeated_blocks():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(SQSInputError, match="checkpoint_blocks needs repeated blocks"):
        compress(net, (torch.randn(8, 4), torch.randint(0, 3, (8,))), SQSConfig(batch_size=4), progress=False,
                 checkpoint_blocks=True)
