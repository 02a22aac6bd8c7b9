"""Language-model distillation: packed soft token targets, their likelihood (closed form, gradients,
the plate's scale), the teacher's targets, and a run whose data term reads them."""
import pytest
import torch
from pyro import poutine

from sqs_pyro import SQSConfig
from sqs_pyro.errors import SQSInputError
from sqs_pyro.hf import CausalLM
from sqs_pyro.infer import compress
from sqs_pyro.infer.data import TEACHER_TOKENS, distillation_targets
from sqs_pyro.models import TokenCategoricalLikelihood, transformer_include
from sqs_pyro.models.likelihoods import sparse_token_log_likelihood, sparse_token_targets
from tiny_hf import tiny_llama


def tiny_lm(seed: int = 0) -> CausalLM:
    return CausalLM(tiny_llama(seed=seed))


def test_soft_token_log_likelihood_and_gradient_match_the_closed_form():
    """``sum_j t_j log softmax(logits)[v_j]`` with repeated ids, over more rows than one chunk, in float64."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 300, 11, generator=g, dtype=torch.float64)).requires_grad_(True)
    ids = torch.randint(0, 11, (2, 300, 5), generator=g)
    ids[..., 1] = ids[..., 0]  # a token listed twice counts twice
    weights = torch.rand(2, 300, 5, generator=g, dtype=torch.float64)
    targets = sparse_token_targets(ids, weights)
    assert targets.shape == (2, 300, 2, 5) and torch.equal(targets[..., 0, :].long(), ids)
    mine = sparse_token_log_likelihood(logits, targets)
    expected = (weights * logits.log_softmax(-1).gather(-1, ids)).sum(-1)
    torch.testing.assert_close(mine, expected)
    upstream = torch.randn(2, 300, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad((mine * upstream).sum(), logits)[0],
                               torch.autograd.grad((expected * upstream).sum(), logits)[0])
    small = logits[:1, :3].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: sparse_token_log_likelihood(t, targets[:1, :3]), (small,))


def test_one_token_of_weight_one_is_the_hard_likelihood_scaled_by_sequences():
    lik = TokenCategoricalLikelihood(num_data=10)
    g = torch.Generator().manual_seed(0)  # its own draws: the result may not depend on the tests run before it
    logits, y = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)

    def density(target):
        return float(poutine.trace(lambda: lik(logits, target)).get_trace().log_prob_sum())

    hard = density(y)
    assert hard == pytest.approx(10 / 2 * float(torch.distributions.Categorical(logits=logits).log_prob(y).sum()))
    soft = sparse_token_targets(y.unsqueeze(-1), torch.ones(2, 5, 1))
    assert density(soft) == pytest.approx(hard, rel=1e-6)
    spread = sparse_token_targets(torch.arange(7).expand(2, 5, 7), torch.full((2, 5, 7), 1 / 7))  # control
    assert density(spread) == pytest.approx(10 / 2 * float(logits.log_softmax(-1).sum() / 7), rel=1e-6)
    assert abs(density(spread) - hard) > 1.0


def test_sparse_targets_refuse_mismatched_shapes():
    with pytest.raises(SQSInputError, match="differ in shape"):
        sparse_token_targets(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4))


def test_token_targets_hold_the_label_and_the_teachers_top_tokens():
    net = tiny_lm().train()
    x = torch.randint(0, 40, (5, 9))
    y = torch.randint(0, 40, (5, 9))
    with torch.no_grad():
        probs = net.eval()(x).softmax(-1)
    net.train()
    top, ids = probs.topk(TEACHER_TOKENS, dim=-1)
    for weight in (0.0, 0.3, 1.0):
        t = distillation_targets(net, torch.utils.data.TensorDataset(x, y), weight, batch_size=2, task="lm").tensors[1]
        assert t.shape == (5, 9, 2, TEACHER_TOKENS + 1)
        assert torch.equal(t[..., 0, 0].long(), y) and torch.equal(t[..., 0, 1:].long(), ids)
        torch.testing.assert_close(t[..., 1, 0], torch.full((5, 9), 1 - weight))
        torch.testing.assert_close(t[..., 1, 1:], weight * top / top.sum(-1, keepdim=True))
        torch.testing.assert_close(t[..., 1, :].sum(-1), torch.ones(5, 9))
    assert net.training


def codes(labels, weight):
    net, x = tiny_lm(), torch.randint(0, 40, (16, 8), generator=torch.Generator().manual_seed(1))
    config = SQSConfig(components=4, sparsity=0.5, epochs=2.0, batch_size=4, distill_weight=weight,
                       include=transformer_include("llama"))
    return [c.codes for c in compress(net, (x, labels(x)), config, task="lm", progress=False).compressed().layers]


def test_at_weight_one_the_lm_run_reads_the_teacher_not_the_labels():
    shifted = lambda x: torch.roll(x, -1, dims=1)  # noqa: E731
    flipped = lambda x: 39 - shifted(x)  # noqa: E731
    same = lambda a, b: all(torch.equal(u, v) for u, v in zip(a, b))  # noqa: E731
    assert same(codes(shifted, 1.0), codes(flipped, 1.0))
    assert not same(codes(shifted, 0.5), codes(flipped, 0.5))  # control: with the labels in the target they differ
