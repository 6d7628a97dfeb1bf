"""Gram and loss maths against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from nst_exp.model.losses import (
    ContentLoss,
    GramStyleLoss,
    MeanCovStyleLoss,
    StyleTransferLoss,
    blend,
    gram_matrix,
    layer_weights,
    mean_and_covariance,
    positions_by_channels,
    total_variation,
)


def test_gram_matrix_by_hand():
    # 2 channels, 2x1 positions: f0 = [1, 2], f1 = [3, 4]
    f = torch.tensor([[[[1.0], [2.0]], [[3.0], [4.0]]]])
    g = gram_matrix(f)
    # mean over positions of f f^T: [[(1+4)/2, (3+8)/2], [(3+8)/2, (9+16)/2]]
    assert torch.allclose(g, torch.tensor([[[2.5, 5.5], [5.5, 12.5]]]))


def test_gram_is_batch_safe_and_size_invariant():
    f = torch.rand(3, 4, 5, 6)
    g = gram_matrix(f)
    assert g.shape == (3, 4, 4)
    assert torch.allclose(g[1], gram_matrix(f[1:2])[0])
    tiled = f.repeat(1, 1, 2, 2)  # the same statistics on 4x the positions
    assert torch.allclose(gram_matrix(tiled), g, atol=1e-6)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_statistics_read_either_layout_without_copying(layout):
    # NCHW on the CPU, NHWC on CUDA: both are viewed as (B, H*W, C), never copied.
    x = torch.randn(2, 5, 7, 3).contiguous(memory_format=layout)
    flat = positions_by_channels(x)
    assert flat.shape == (2, 21, 5) and flat.data_ptr() == x.data_ptr()
    torch.testing.assert_close(gram_matrix(x), torch.einsum("bchw,bdhw->bcd", x, x) / 21)
    mean, cov = mean_and_covariance(x)
    centred = x - x.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(mean, x.mean(dim=(2, 3)))
    torch.testing.assert_close(cov, torch.einsum("bchw,bdhw->bcd", centred, centred) / 21)


def test_mean_and_covariance_by_hand():
    f = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]]])  # channel 0: 1, 3; channel 1: 2, 2
    mean, cov = mean_and_covariance(f)
    assert torch.allclose(mean, torch.tensor([[2.0, 2.0]]))
    assert torch.allclose(cov, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))


def test_content_loss_is_mse_and_relative_when_normalised():
    target = torch.full((1, 1, 2, 2), 2.0)
    x = torch.full((1, 1, 2, 2), 3.0)
    assert ContentLoss(target, normalize=False)(x).item() == pytest.approx(1.0)
    # relative: mse / mean(target^2) = 1 / 4
    assert ContentLoss(target, normalize=True)(x).item() == pytest.approx(0.25)


def test_gram_style_loss_by_hand():
    f_target = torch.tensor([[[[1.0], [2.0]], [[3.0], [4.0]]]])
    f = torch.zeros_like(f_target)
    loss = GramStyleLoss(gram_matrix(f_target), normalize=False)
    # MSE between 0 and [[2.5, 5.5], [5.5, 12.5]]
    expected = (2.5**2 + 5.5**2 + 5.5**2 + 12.5**2) / 4
    assert loss(f).item() == pytest.approx(expected)
    assert loss(f_target).item() == pytest.approx(0.0)
    normalised = GramStyleLoss(gram_matrix(f_target), normalize=True)
    assert normalised(f).item() == pytest.approx(1.0, rel=1e-5)  # zero features: relative error 1


def test_style_target_blends_grams():
    a, b = torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4)
    blended = blend([GramStyleLoss.target_from_stats(GramStyleLoss.stats(x), 16) for x in (a, b)], [0.25, 0.75])
    assert torch.allclose(blended, 0.25 * gram_matrix(a) + 0.75 * gram_matrix(b))


def test_mean_cov_loss_zero_at_target():
    f = torch.rand(1, 4, 5, 5)
    loss = MeanCovStyleLoss(*blend([MeanCovStyleLoss.target_from_stats(MeanCovStyleLoss.stats(f), 25)], [1.0]))
    assert loss(f).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(f * 2).item() > 0


def test_total_variation_by_hand():
    img = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    # vertical diffs all 0; horizontal diffs all 1
    assert total_variation(img).item() == pytest.approx(1.0)


def test_layer_weights_default_equal_and_length_checked():
    assert layer_weights(["a", "b"], [], "style") == [0.5, 0.5]
    assert layer_weights(["a"], [2.0], "style") == [2.0]
    with pytest.raises(ValueError, match="style_layer_weights has 1 values for 2"):
        layer_weights(["a", "b"], [1.0], "style")


def test_total_combines_alpha_beta_tv():
    class Identity(torch.nn.Module):
        def forward(self, image):
            return {"x": image}

    image = torch.rand(1, 3, 4, 4)
    content_t, style_t = torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4)
    loss = StyleTransferLoss(
        Identity(),
        {"x": ContentLoss(content_t, normalize=False)},
        {"x": GramStyleLoss(gram_matrix(style_t), normalize=False)},
        [1.0],
        [0.5],
        content_weight=2.0,
        style_weight=3.0,
        tv_weight=4.0,
    )
    terms = loss(image)
    c = torch.nn.functional.mse_loss(image, content_t)
    s = 0.5 * torch.nn.functional.mse_loss(gram_matrix(image), gram_matrix(style_t))
    tv = total_variation(image)
    assert terms["loss/content"].item() == pytest.approx(c.item())
    assert terms["loss/style/x"].item() == pytest.approx(s.item())
    assert terms["loss/total"].item() == pytest.approx((2 * c + 3 * s + 4 * tv).item(), rel=1e-5)
    assert set(loss.term_names()) == set(terms)


@pytest.mark.parametrize("channels_last", [False, True])
def test_outer_sum_gradient_is_autograds_in_the_features_layout(channels_last):
    """outer_sum's own backward ((dG + dG^T) f, one product) equals autograd's through bmm, and comes
    back in the features' memory format (the ReLU backward then runs contiguous)."""
    from nst_exp.model.losses import outer_sum, positions_by_channels

    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = torch.randn(2, 5, 5, dtype=torch.float64)  # not symmetric: both halves of dG count
    (outer_sum(x) * weight).sum().backward()
    ours, x.grad = x.grad, None
    flat = positions_by_channels(x)
    (torch.bmm(flat.transpose(1, 2), flat) * weight).sum().backward()
    torch.testing.assert_close(ours, x.grad)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert ours.is_contiguous(memory_format=fmt)
    assert torch.autograd.gradcheck(outer_sum, (x.detach().clone().requires_grad_(True),))
