"""Pathology tile augmentations on float (3, H, W) tensors in [0, 1].

H&E tiles have no canonical orientation, so flips and 90-degree rotations are label-preserving.
Stain variation between laboratories is modelled by jittering the haematoxylin, eosin and DAB
concentrations after colour deconvolution (Ruifrok and Johnston, "Quantification of histochemical
staining by color deconvolution", Anal. Quant. Cytol. Histol. 2001), as in the "HED" augmentation
of Tellez et al., "Quantifying the effects of data augmentation and stain color normalization in
convolutional neural networks for computational pathology", Medical Image Analysis 2019,
https://arxiv.org/abs/1902.06543. The stain matrix and the optical-density scaling are those of
``skimage.color.rgb2hed``, and the tests check the conversion against scikit-image when it is installed.

Every random draw comes from a ``torch.Generator`` passed by the caller, so a tile's augmentation
depends only on that generator's seed and not on worker processes or the global random state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as tvf

# Rows are the RGB absorbance of haematoxylin, eosin and DAB (skimage.color.rgb_from_hed).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)

# Intensities are clamped to this floor before the logarithm. Dividing by log(1e-6) scales optical
# density as scikit-image does, so stain concentrations are comparable with its output.
_MIN_INTENSITY = 1e-6
_LOG_ADJUST = math.log(_MIN_INTENSITY)


def rgb_to_hed(rgb: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
    """Convert (..., 3, H, W) RGB in [0, 1] to haematoxylin, eosin and DAB concentrations.

    Args:
        rgb: image(s) with channels before height and width.
        clamp: set negative concentrations to 0, as ``skimage.color.rgb2hed`` does. Without it
            the conversion is exactly invertible by :func:`hed_to_rgb`.
    """
    optical_density = torch.log(rgb.clamp_min(_MIN_INTENSITY)) / _LOG_ADJUST
    stains = torch.einsum("...chw,cs->...shw", optical_density, HED_FROM_RGB.to(rgb.dtype).to(rgb.device))
    return stains.clamp_min(0.0) if clamp else stains


def hed_to_rgb(stains: torch.Tensor) -> torch.Tensor:
    """Convert (..., 3, H, W) stain concentrations back to RGB in [0, 1] (``skimage.color.hed2rgb``)."""
    log_rgb = torch.einsum("...shw,sc->...chw", stains, RGB_FROM_HED.to(stains.dtype).to(stains.device)) * _LOG_ADJUST
    return torch.exp(log_rgb).clamp(0.0, 1.0)


def _uniform(generator: torch.Generator, low: float, high: float, size: int = 1) -> torch.Tensor:
    return torch.empty(size, dtype=torch.float64).uniform_(low, high, generator=generator)


@dataclass(frozen=True)
class TileAugment:
    """Random flips, 90-degree rotations, colour jitter and mild Gaussian blur.

    Attributes:
        flips: flip horizontally and vertically, each with probability 0.5.
        rotate90: rotate by a random multiple of 90 degrees (square tiles only).
        color_jitter: ``hed`` scales each stain concentration by a factor in [1 - s, 1 + s] and
            shifts it by an offset in [-s / 5, s / 5] (s = ``color_strength``). ``hsv`` shifts
            the hue by up to s of the colour circle and scales saturation and brightness by a
            factor in [1 - s, 1 + s]. ``none`` leaves colours unchanged.
        color_strength: s above.
        blur_prob: probability of a Gaussian blur with sigma drawn from ``blur_sigma``.
        blur_sigma: (min, max) blur standard deviation in pixels.
    """

    flips: bool = True
    rotate90: bool = True
    color_jitter: str = "hed"
    color_strength: float = 0.05
    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.0)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment one float (3, H, W) image in [0, 1] and return a new tensor of the same shape."""
        draws = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        if self.flips and draws[0] < 0.5:
            image = image.flip(-1)
        if self.flips and draws[1] < 0.5:
            image = image.flip(-2)
        if self.rotate90 and image.shape[-1] == image.shape[-2]:
            image = torch.rot90(image, int(draws[2] * 4) % 4, dims=(-2, -1))

        if self.color_jitter == "hed" and self.color_strength > 0:
            image = self._jitter_hed(image, generator)
        elif self.color_jitter == "hsv" and self.color_strength > 0:
            image = self._jitter_hsv(image, generator)

        if draws[3] < self.blur_prob:
            sigma = float(_uniform(generator, *self.blur_sigma))
            kernel = 2 * math.ceil(3 * sigma) + 1
            image = tvf.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
        return image.contiguous()

    def _jitter_hed(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        strength = self.color_strength
        scale = _uniform(generator, 1.0 - strength, 1.0 + strength, 3).to(image.dtype).view(3, 1, 1)
        # On this scale the median stain concentration of H&E tiles is about 0.02 (measured on the
        # CRC-VAL-HE-7K test tiles), and an offset of 0.01 already changes an RGB intensity by up
        # to about 9 %. The offset range is therefore a fifth of the scale range.
        shift = _uniform(generator, -strength / 5, strength / 5, 3).to(image.dtype).view(3, 1, 1)
        stains = rgb_to_hed(image, clamp=False)
        return hed_to_rgb(stains * scale + shift)

    def _jitter_hsv(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        strength = self.color_strength
        hue, saturation, brightness = _uniform(generator, -1.0, 1.0, 3).tolist()
        image = tvf.adjust_hue(image, hue * strength)
        image = tvf.adjust_saturation(image, 1.0 + saturation * strength)
        return tvf.adjust_brightness(image, 1.0 + brightness * strength).clamp(0.0, 1.0)
