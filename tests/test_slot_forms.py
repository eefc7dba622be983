"""SLOT's loss in its two forms: rows gathered by window index (the CPU's, whose backward is a
sequential index_add) and the one-hot matmul CUDA runs (whose backward is a matmul, not an
atomic scatter-add). Both must give the same loss and, to float32 rounding, the same gradient."""

import torch
import torch.nn.functional as F

import train_gpt as tg


def grads(expand, delta0, bias0, base, y, w, weight):
    delta, bias = delta0.clone().requires_grad_(), bias0.clone().requires_grad_()
    loss = tg.slot_loss(delta, bias, base, expand, y, w, weight, 30.0)
    loss.backward()
    return loss.detach(), delta.grad, bias.grad


def test_one_hot_form_equals_the_gather_form():
    gen = torch.Generator().manual_seed(0)
    B, d, V, n = 6, 16, 64, 300
    weight = torch.randn(V, d, generator=gen) * 0.3
    base = torch.randn(n, V, generator=gen) * 2
    rows = torch.sort(torch.randint(0, B, (n,), generator=gen)).values  # fit rows, window order
    y = torch.randint(0, V, (n,), generator=gen)
    w = torch.full((n,), 1.0 / (n - 20))
    w[-20:] = 0.0  # padding entries weigh nothing
    delta0 = torch.randn(B, d, generator=gen) * 0.1
    bias0 = torch.randn(B, V, generator=gen) * 0.1
    loss_g, d_g, b_g = grads(rows, delta0, bias0, base, y, w, weight)
    loss_h, d_h, b_h = grads(F.one_hot(rows, B).float(), delta0, bias0, base, y, w, weight)
    # The forward adds the same shift to each row either way (x * 1 + 0s is exact).
    assert torch.equal(loss_g, loss_h)
    # Each window's gradient is a sum over its rows, in another order: float32 rounding only.
    torch.testing.assert_close(d_h, d_g, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b_h, b_g, rtol=1e-5, atol=1e-8)
    # ... and a window with no rows gets no gradient in either form.
    empty = sorted(set(range(B)) - set(rows.tolist()))
    for k in empty:
        assert not b_g[k].any() and not b_h[k].any()


def test_the_gather_form_matches_an_independent_sum():
    """The CPU form against the gradient written out: d loss / d bias[k] = sum over window k's
    rows of w * (softmax(capped) - onehot(y)) * dcap/dz."""
    gen = torch.Generator().manual_seed(1)
    B, d, V, n = 3, 8, 32, 40
    weight, base = torch.randn(V, d, generator=gen), torch.randn(n, V, generator=gen)
    rows = torch.sort(torch.randint(0, B, (n,), generator=gen)).values
    y, w = torch.randint(0, V, (n,), generator=gen), torch.full((n,), 1.0 / n)
    delta0, bias0 = torch.zeros(B, d), torch.zeros(B, V)
    _, _, b_g = grads(rows, delta0, bias0, base, y, w, weight)
    z = base.double()
    capped = 30.0 * torch.tanh(z / 30.0)
    dz = (torch.softmax(capped, -1) - F.one_hot(y, V).double()) * (1 - torch.tanh(z / 30.0) ** 2)
    expected = torch.zeros(B, V, dtype=torch.float64).index_add_(0, rows, dz * w.double()[:, None])
    torch.testing.assert_close(b_g.double(), expected, rtol=1e-5, atol=1e-8)
