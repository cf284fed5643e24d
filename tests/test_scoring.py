"""Per-sample input gradients from one batched pass: equal to a per-slice loop, to finite
differences, and independent of batch-mates."""

from __future__ import annotations

import math

import pytest
import torch

from napari_vaeloc.models.vae import MLPVAE, ConvVAE
from napari_vaeloc.scoring import (
    elbo_input_gradient,
    gaussian_kernel,
    gaussian_nll,
    input_gradients,
    kl_per_sample,
    score_batch,
)


@pytest.fixture
def net() -> ConvVAE:
    torch.manual_seed(3)
    return ConvVAE(image_size=16, widths=(4, 8), z_dim=6).eval().requires_grad_(False)


def test_batched_gradients_equal_per_slice_loop(net):
    x = torch.randn(5, 1, 16, 16)
    batch = score_batch(net, x, likelihood_log_std=-0.5)
    for i in range(5):
        one = score_batch(net, x[i : i + 1], likelihood_log_std=-0.5)
        for k in ("kl_grad", "rec_grad", "elbo_grad", "rec_error", "combi", "kl", "rec"):
            torch.testing.assert_close(batch[k][i : i + 1], one[k], rtol=1e-5, atol=1e-6)


def test_gradients_match_finite_differences(net):
    net = net.double()
    torch.manual_seed(1)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    g_kl, g_rec, *_ = input_gradients(net, x, likelihood_log_std=0.3)

    def terms(xx):
        mu, ls = net.encode(xx)
        rec = gaussian_nll(xx, net.decode(mu), 0.3).flatten(1).sum(1)
        return kl_per_sample(mu, ls), rec

    eps = 1e-6
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        b, i, j = (int(torch.randint(0, n, (1,), generator=gen)) for n in (2, 16, 16))
        xp, xm = x.clone(), x.clone()
        xp[b, 0, i, j] += eps
        xm[b, 0, i, j] -= eps
        (klp, recp), (klm, recm) = terms(xp), terms(xm)
        fd_kl = float((klp[b] - klm[b]) / (2 * eps))
        fd_rec = float((recp[b] - recm[b]) / (2 * eps))
        assert math.isclose(float(g_kl[b, 0, i, j]), fd_kl, rel_tol=1e-5, abs_tol=1e-7)
        assert math.isclose(float(g_rec[b, 0, i, j]), fd_rec, rel_tol=1e-5, abs_tol=1e-7)
        # the other sample's losses do not move: gradients are per sample
        other = 1 - b
        assert abs(float(klp[other] - klm[other])) < 1e-12


def test_kl_grad_independent_of_batch_mates(net):
    torch.manual_seed(5)
    target = torch.randn(1, 1, 16, 16)
    mates_a = torch.randn(7, 1, 16, 16) * 3
    mates_b = torch.zeros(2, 1, 16, 16)
    a = score_batch(net, torch.cat([mates_a[:3], target, mates_a[3:]]))
    b = score_batch(net, torch.cat([target, mates_b]))
    for k in ("kl_grad", "elbo_grad", "combi", "rec_error"):
        torch.testing.assert_close(a[k][3], b[k][0], rtol=1e-5, atol=1e-7)


def test_maps_and_scores_follow_definitions(net):
    torch.manual_seed(2)
    x = torch.randn(3, 1, 16, 16)
    out = score_batch(net, x, likelihood_log_std=0.0, kl_grad_scale=2.0)
    x_hat = out["reconstruction"]
    nll = 0.5 * (x[:, 0] - x_hat) ** 2 + 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(out["rec_error"], nll)
    torch.testing.assert_close(out["sq_error"], (x[:, 0] - x_hat) ** 2)
    torch.testing.assert_close(out["rec"], nll.flatten(1).sum(1))
    torch.testing.assert_close(out["elbo"], out["kl"] + out["rec"])
    torch.testing.assert_close(out["combi"], out["kl_grad"] / 2.0 * out["rec_error"])
    assert (out["kl"] >= 0).all()
    # z = mu: scoring is deterministic
    again = score_batch(net, x, likelihood_log_std=0.0, kl_grad_scale=2.0)
    torch.testing.assert_close(out["kl_grad"], again["kl_grad"], rtol=0, atol=0)


def test_gaussian_kernel_is_the_papers():
    k = gaussian_kernel()
    assert k.shape == (1, 1, 7, 7)
    assert float(k.sum()) == pytest.approx(1.0)
    # sigma 3 px: ratio of the centre to one pixel off-centre along an axis
    assert float(k[0, 0, 3, 3] / k[0, 0, 3, 4]) == pytest.approx(math.exp(1 / 18), rel=1e-5)


def test_paper_architecture_shapes():
    net = ConvVAE()
    assert [m.out_channels for m in net.encoder if hasattr(m, "out_channels")] == [
        16,
        32,
        64,
        256,
        512,
    ]
    assert all(getattr(m, "bias", None) is None for m in net.modules() if hasattr(m, "bias"))
    mu, ls = net.encode(torch.zeros(2, 1, 64, 64))
    assert mu.shape == ls.shape == (2, 256)
    assert net.decode(mu).shape == (2, 1, 64, 64)
    small = ConvVAE(image_size=32, z_dim=64)
    assert small.decode(small.encode(torch.zeros(1, 1, 32, 32))[0]).shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="4x4"):
        ConvVAE(image_size=64, widths=(8, 16))
    mlp = MLPVAE()
    with torch.no_grad():
        mu, _ = mlp.encode(torch.rand(4, 1, 28, 28))
        out = mlp.decode(mu)
    assert mu.shape == (4, 20) and out.shape == (4, 1, 28, 28)
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_restoration_follows_its_definition(net):
    from napari_vaeloc.scoring import RESTORATION_STEP, RESTORATION_STEPS, smooth

    torch.manual_seed(4)
    x = torch.randn(2, 1, 16, 16)
    out = score_batch(net, x)
    restored = x.clone()
    for _ in range(RESTORATION_STEPS):  # one image at a time: the batch does not matter
        for i in range(2):
            g_kl, g_rec = input_gradients(net, restored[i : i + 1])[:2]
            restored[i : i + 1] -= RESTORATION_STEP * (g_kl + g_rec)
    want = smooth((x - restored).abs(), gaussian_kernel())[:, 0]
    torch.testing.assert_close(out["restoration"], want, rtol=1e-4, atol=1e-5)
    assert float(out["restoration"].abs().max()) > 0
    assert "restoration" not in score_batch(net, x, restoration=False)


@pytest.mark.parametrize("channels", [1, 3])
def test_elbo_gradient_in_one_pass_is_the_sum_of_both(channels):
    torch.manual_seed(5)
    net = ConvVAE(image_size=16, widths=(4, 8), z_dim=6, in_channels=channels, out_channels=1)
    net = net.eval()
    x = torch.randn(3, channels, 16, 16)
    g_kl, g_rec = input_gradients(net, x, likelihood_log_std=-0.3)[:2]
    g = elbo_input_gradient(net, x, likelihood_log_std=-0.3)
    assert g.shape == x.shape and float(g.abs().max()) > 0
    torch.testing.assert_close(g, g_kl + g_rec, rtol=1e-5, atol=1e-6)
