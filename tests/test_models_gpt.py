"""The GPT decoder: shapes, causality, weight tying, rotary positions, sampling, bad arguments,
second derivatives through attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lightning_spectral.diagnostics import estimate_sharpness
from lightning_spectral.models import GPT, MODEL_REGISTRY, get_model
from lightning_spectral.models.gpt import RotaryEmbedding

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16)


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_shapes_and_parameter_names(position):
    torch.manual_seed(0)
    net = GPT(**TINY, position=position)
    idx = torch.randint(0, 32, (3, 16))
    assert net(idx).shape == (3, 16, 32)
    assert net(idx[:, :5]).shape == (3, 5, 32)  # shorter contexts are fine
    names = dict(net.named_parameters())
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert names[f"blocks.1.attn.{proj}.weight"].shape == (16, 16)  # four separate matrices
    assert ("pos_emb.weight" in names) == (position == "learned")
    assert list(names)[-1] == "ln_f.weight"  # the head is tied: its weight is tok_emb.weight
    assert list(dict(net.named_modules()))[-1] == "lm_head"  # the head is registered last


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_a_future_token_never_changes_an_earlier_logit(position):
    torch.manual_seed(0)
    net = GPT(**TINY, position=position).eval()
    idx = torch.randint(0, 32, (2, 16))
    base = net(idx)
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 32
        out = net(changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"a change at position {t} reached earlier logits"
        assert not torch.equal(out[:, t], base[:, t])  # and the model does look at its input


def test_weight_tying():
    torch.manual_seed(0)
    tied = GPT(**TINY)
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = GPT(**TINY, tie_weights=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 32 * 16
    # One tensor, so the gradient of the tied weight sums the input and output roles.
    tied(torch.randint(0, 32, (2, 8))).sum().backward()
    assert tied.tok_emb.weight.grad is not None and tied.lm_head.weight.grad is tied.tok_emb.weight.grad


def test_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    net = GPT(vocab_size=64, block_size=8, n_layer=8, n_head=4, n_embd=256)
    std = lambda w: float(w.detach().std())  # noqa: E731
    assert abs(std(net.blocks[0].attn.q_proj.weight) - 0.02) < 2e-3
    assert abs(std(net.blocks[0].attn.o_proj.weight) - 0.02 / 4.0) < 5e-4  # 0.02 / sqrt(2 * 8)
    assert abs(std(net.blocks[0].mlp.proj.weight) - 0.02 / 4.0) < 5e-4


def test_rotary_scores_depend_on_relative_position_only():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=8, block_size=32)
    q, k = torch.randn(8), torch.randn(8)
    at = lambda v, pos: rope(v.expand(1, 1, 32, 8).clone())[0, 0, pos]  # noqa: E731
    s, t = 5, 2
    reference = at(q, s) @ at(k, t)
    for shift in (1, 9, 20):
        assert torch.allclose(at(q, s + shift) @ at(k, t + shift), reference, atol=1e-5)
    assert not torch.allclose(at(q, s + 1) @ at(k, t), reference, atol=1e-3)
    x = torch.randn(1, 1, 32, 8)
    assert torch.allclose(rope(x).norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation


def test_generate_greedy_top_k_and_context_crop():
    torch.manual_seed(0)
    net = GPT(**TINY).eval()
    prompt = torch.randint(0, 32, (2, 3))
    greedy = net.generate(prompt, 20, temperature=0.0)  # runs past block_size: the context is cropped
    assert greedy.shape == (2, 23) and torch.equal(greedy[:, :3], prompt)
    top1 = net.generate(prompt, 20, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(top1, greedy)
    a = net.generate(prompt, 10, generator=torch.Generator().manual_seed(3))
    b = net.generate(prompt, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # the next token of a long context depends on the last block_size tokens only
    long = torch.randint(0, 32, (1, 40))
    assert torch.equal(net.generate(long, 1, temperature=0.0)[:, -1], net.generate(long[:, -16:], 1, temperature=0.0)[:, -1])


def test_registry_and_width_mult():
    assert MODEL_REGISTRY["gpt"] is GPT
    net = get_model("gpt", num_classes=256, n_layer=1, n_head=2, n_embd=32, block_size=8)
    assert net.vocab_size == 256 and net.lm_head.out_features == 256
    wide = GPT(**TINY, width_mult=2.0)
    assert (wide.n_embd, wide.head_dim, wide.n_head) == (32, 16, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive int"),
        (dict(position="alibi"), "position must be one of"),
        (dict(dropout=1.0), "dropout"),
        (dict(vocab_size=16, num_classes=32), "disagree"),
        (dict(n_embd=18, n_head=2, position="rotary"), "even head_dim"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPT(**{**TINY, **kwargs})


def test_bad_inputs_name_the_problem():
    net = GPT(**TINY)
    with pytest.raises(ValueError, match="exceeds block_size"):
        net(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        net(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="top_k"):
        net.generate(torch.zeros(1, 2, dtype=torch.long), 3, top_k=0)


def test_second_derivatives_through_attention_in_eval_and_train_mode():
    """The Hessian of the loss exists in eval mode from plain PyTorch (attention takes the math
    backend there) and in train mode under diagnostics.isolated (which selects it): with no
    dropout both are the same function, and Lanczos in train mode finds the exact top eigenvalue."""
    torch.manual_seed(0)
    vocab = 8
    net = GPT(vocab_size=vocab, block_size=4, n_layer=1, n_head=1, n_embd=4)
    x, y = torch.randint(0, vocab, (3, 4)), torch.randint(0, vocab, (3, 4))
    names, shapes = zip(*((n, p.shape) for n, p in net.named_parameters()))
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(theta):
        sizes = [math.prod(s) for s in shapes]
        params = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return F.cross_entropy(functional_call(net, params, (x,)).reshape(-1, vocab), y.reshape(-1))

    net.eval()
    exact = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1])
    net.train()
    got = estimate_sharpness(net, lambda m, a, b: F.cross_entropy(m(a).reshape(-1, vocab), b.reshape(-1)), x, y,
                             method="lanczos", max_iter=60, tol=1e-10, eval_mode=False)
    assert net.training
    assert abs(got - exact) <= 1e-4 * abs(exact), (got, exact)
