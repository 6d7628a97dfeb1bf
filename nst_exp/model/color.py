"""Colour preservation (Gatys et al. 2017, "Controlling Perceptual Factors in Neural Style Transfer").

- luminance: transfer style on luminance only (YIQ), then put the content's chroma back.
- histogram: recolour the style image so its colour mean and covariance match the content's.
"""

from __future__ import annotations

import torch
from torch import Tensor

# RGB -> YIQ (NTSC). Rows: Y, I, Q.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])


def rgb_to_yiq(image: Tensor) -> Tensor:
    return torch.einsum("ij,bjhw->bihw", _RGB_TO_YIQ.to(image), image)


def yiq_to_rgb(image: Tensor) -> Tensor:
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_RGB_TO_YIQ).to(image), image)


def luminance(image: Tensor) -> Tensor:
    """Y as a 3-channel grey image, so VGG sees it as it would a photo."""
    return rgb_to_yiq(image)[:, :1].expand(-1, 3, -1, -1).contiguous()


def match_luminance(style_grey: Tensor, content_grey: Tensor) -> Tensor:
    """Shift and scale the style's luminance to the content's mean and std (as in the paper)."""
    s_mean, s_std = style_grey.mean(), style_grey.std().clamp_min(1e-5)
    c_mean, c_std = content_grey.mean(), content_grey.std()
    return ((style_grey - s_mean) / s_std * c_std + c_mean).clamp(0, 1)


def with_content_chroma(grey_result: Tensor, content: Tensor) -> Tensor:
    """Y of the result, I and Q of the content (content resized to the result if needed)."""
    if content.shape[-2:] != grey_result.shape[-2:]:
        content = torch.nn.functional.interpolate(content, size=grey_result.shape[-2:], mode="bicubic", align_corners=False)
    yiq = rgb_to_yiq(content)
    yiq = torch.cat([rgb_to_yiq(grey_result)[:, :1], yiq[:, 1:]], dim=1)
    return yiq_to_rgb(yiq).clamp(0, 1)


def _sqrtm(matrix: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(matrix)
    return vecs @ torch.diag(vals.clamp_min(1e-8).sqrt()) @ vecs.T


def match_color_histogram(style: Tensor, content: Tensor) -> Tensor:
    """Affine recolouring of ``style`` so its RGB mean and covariance equal the content's."""
    s = style[0].reshape(3, -1).double()
    c = content[0].reshape(3, -1).double()
    s_mean, c_mean = s.mean(1, keepdim=True), c.mean(1, keepdim=True)
    s_cov = torch.cov(s) + 1e-5 * torch.eye(3, dtype=s.dtype)
    c_cov = torch.cov(c) + 1e-5 * torch.eye(3, dtype=s.dtype)
    transform = _sqrtm(c_cov) @ torch.linalg.inv(_sqrtm(s_cov))
    out = transform @ (s - s_mean) + c_mean
    return out.reshape(style.shape).to(style.dtype).clamp(0, 1)
