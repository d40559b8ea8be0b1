"""Multi-crop augmentation for pathology tiles and iBOT block masks.

Two geometric modes make the crops:

* ``crop_resize`` (DINOv2): a random-resized crop of 32-100 % of the area for the two global crops
  and 5-32 % for the local crops, resized to 224 and 98 px, so magnification varies per crop.
* ``extended_context`` (Virchow2, "extended-context translation"): the source is a larger context
  region (392 px by default). Each crop keeps almost its output size (side x0.9-1.1, aspect
  0.95-1.05) and moves around the region, so cells keep their size and shape.

Then come flips, optional 90-degree rotations, colour jitter, grey scale, Gaussian blur and
solarisation, with DINOv2's per-crop probabilities. Vertical flips are a Virchow2 addition, because
tissue has no up or down. Every random draw comes from the ``numpy.random.Generator`` passed in, so a
sample is a pure function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from virchow.pretrain.config import CropsConfig

# Kernel side of the Gaussian blur, with sigma drawn from BLUR_SIGMA (DINOv2's GaussianBlur).
BLUR_KERNEL = 9
BLUR_SIGMA = (0.1, 2.0)
# Aspect-ratio range of crop_resize crops (torchvision's RandomResizedCrop default).
CROP_RESIZE_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass
class CropSet:
    """The crops of one image.

    Attributes:
        global_crops: (2, 3, G, G) float32, normalised.
        local_crops: (n_local, 3, L, L) float32, normalised; n_local may be 0.
    """

    global_crops: torch.Tensor
    local_crops: torch.Tensor


def image_to_array(image: np.ndarray) -> np.ndarray:
    """Convert an (H, W, 3) uint8 RGB array to float32 in [0, 1]."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got shape {image.shape} and dtype {image.dtype}")
    return image.astype(np.float32) * (1.0 / 255.0)


class MultiCropAugmentation:
    """Make 2 global and ``n_local`` local crops of one image.

    Crops are processed as (H, W, 3) float32 arrays in [0, 1] with OpenCV, which is several times
    faster per crop than torchvision's tensor colour operations, and converted to normalised
    (3, H, W) tensors at the end.

    Args:
        cfg: crop and augmentation settings.
        mean: per-channel mean used for normalisation.
        std: per-channel standard deviation used for normalisation.
    """

    def __init__(self, cfg: CropsConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.cfg = cfg
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> CropSet:
        """Augment an (H, W, 3) uint8 RGB image into a :class:`CropSet`."""
        cfg = self.cfg
        source = image_to_array(image)
        global_crops = []
        for index in range(2):
            crop = self._geometric(source, cfg.global_size, cfg.global_scale, rng)
            crop = self._photometric(crop, rng, blur=cfg.blur_global[index], solarize=cfg.solarize if index == 1 else 0.0)
            global_crops.append(self._normalise(crop))
        local_crops = []
        for _ in range(cfg.n_local):
            crop = self._geometric(source, cfg.local_size, cfg.local_scale, rng)
            crop = self._photometric(crop, rng, blur=cfg.blur_local, solarize=0.0)
            local_crops.append(self._normalise(crop))
        locals_array = (
            np.stack(local_crops) if local_crops else np.empty((0, 3, cfg.local_size, cfg.local_size), np.float32)
        )
        return CropSet(global_crops=torch.from_numpy(np.stack(global_crops)), local_crops=torch.from_numpy(locals_array))

    # ------------------------------------------------------------------ geometry

    def _geometric(self, source: np.ndarray, size: int, scale: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
        height, width = source.shape[:2]
        if self.cfg.mode == "extended_context":
            top, left, crop_h, crop_w = extended_context_box(height, width, size, self.cfg.ect_scale, self.cfg.ect_ratio, rng)
        else:
            top, left, crop_h, crop_w = random_resized_box(height, width, scale, CROP_RESIZE_RATIO, rng)
        crop = source[top : top + crop_h, left : left + crop_w]
        if (crop_h, crop_w) != (size, size):
            # Area averaging when shrinking avoids aliasing; bicubic when enlarging, clipped to [0, 1].
            shrinking = crop_h * crop_w > size * size
            crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
            np.clip(crop, 0.0, 1.0, out=crop)
        if rng.random() < self.cfg.horizontal_flip:
            crop = crop[:, ::-1]
        if rng.random() < self.cfg.vertical_flip:
            crop = crop[::-1]
        if self.cfg.rotate90:
            crop = np.rot90(crop, int(rng.integers(0, 4)))
        return np.ascontiguousarray(crop)

    # ------------------------------------------------------------------ colour

    def _photometric(self, crop: np.ndarray, rng: np.random.Generator, *, blur: float, solarize: float) -> np.ndarray:
        cfg = self.cfg
        if rng.random() < cfg.color_jitter:
            # Like torchvision's ColorJitter: each factor is drawn, then applied in a random order.
            adjustments = [
                (adjust_brightness, rng.uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)),
                (adjust_contrast, rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)),
                (adjust_saturation, rng.uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation)),
                (adjust_hue, rng.uniform(-cfg.hue, cfg.hue)),
            ]
            for index in rng.permutation(len(adjustments)):
                function, factor = adjustments[index]
                crop = function(crop, float(factor))
        if rng.random() < cfg.grayscale:
            crop = np.repeat(grayscale(crop)[..., None], 3, axis=2)
        if rng.random() < blur:
            sigma = float(rng.uniform(*BLUR_SIGMA))
            crop = cv2.GaussianBlur(crop, (BLUR_KERNEL, BLUR_KERNEL), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
        if rng.random() < solarize:
            crop = np.where(crop >= 0.5, 1.0 - crop, crop).astype(np.float32)
        return crop

    def _normalise(self, crop: np.ndarray) -> np.ndarray:
        return ((crop - self.mean) / self.std).transpose(2, 0, 1)


def grayscale(image: np.ndarray) -> np.ndarray:
    """Return the (H, W) luma of an (H, W, 3) RGB float image (ITU-R 601 weights, as torchvision)."""
    return image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Scale intensities by ``factor`` and clip to [0, 1]."""
    return np.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean grey level by ``factor`` (1 keeps the image) and clip to [0, 1]."""
    mean = float(grayscale(image).mean())
    return np.clip(image * factor + mean * (1.0 - factor), 0.0, 1.0)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grey version by ``factor`` (0 is grey, 1 keeps the image) and clip to [0, 1]."""
    gray = grayscale(image)[..., None]
    return np.clip(image * factor + gray * (1.0 - factor), 0.0, 1.0)


def adjust_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue by ``shift`` turns of the colour circle (-0.5 to 0.5)."""
    if shift == 0.0:
        return image
    hsv = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.float32), cv2.COLOR_RGB2HSV)  # H in [0, 360)
    hsv[..., 0] = np.mod(hsv[..., 0] + 360.0 * shift, 360.0)
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0.0, 1.0)


def random_resized_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Draw (top, left, height, width) of a random-resized crop, as torchvision's RandomResizedCrop.

    The area is a ``scale`` fraction of the image and the aspect ratio is log-uniform in ``ratio``.
    After 10 failed draws the largest centred crop within ``ratio`` is returned.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def extended_context_box(
    height: int,
    width: int,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """Draw (top, left, height, width) of an extended-context crop of output side ``size``.

    The side is ``size`` times a factor uniform in ``scale`` and the aspect ratio is log-uniform in
    ``ratio``. The box is then placed uniformly inside the image. A box larger than the image is
    shrunk to fit, which happens when the source is smaller than the context size (for example
    224 px tiles with 224 px global crops).
    """
    side = size * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    crop_w = min(width, max(1, int(round(side * math.sqrt(aspect)))))
    crop_h = min(height, max(1, int(round(side / math.sqrt(aspect)))))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return top, left, crop_h, crop_w


class BlockMaskGenerator:
    """Random rectangular blocks of masked patches, as BEiT and DINOv2 draw them.

    Args:
        grid: (rows, columns) of patches of a global crop.
        min_block: smallest block in patches.
        aspect: range of block aspect ratios (log-uniform).
    """

    def __init__(self, grid: tuple[int, int], *, min_block: int = 4, aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> None:
        self.grid = grid
        self.min_block = min_block
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    @property
    def n_patches(self) -> int:
        """Patches of one crop."""
        return self.grid[0] * self.grid[1]

    def __call__(self, n_masked: int, rng: np.random.Generator) -> np.ndarray:
        """Return a (rows * columns,) bool mask with about ``n_masked`` True entries.

        Blocks are added until the target is reached or 10 draws in a row add nothing; blocks may
        overlap but never overshoot the target.
        """
        rows, columns = self.grid
        mask = np.zeros(self.grid, dtype=bool)
        count = 0
        while count < n_masked:
            remaining = n_masked - count
            added = 0
            for _ in range(10):
                target = rng.uniform(self.min_block, max(self.min_block, remaining))
                aspect = math.exp(rng.uniform(*self.log_aspect))
                block_h = int(round(math.sqrt(target * aspect)))
                block_w = int(round(math.sqrt(target / aspect)))
                if not (0 < block_h < rows and 0 < block_w < columns):
                    continue
                top = int(rng.integers(0, rows - block_h + 1))
                left = int(rng.integers(0, columns - block_w + 1))
                window = mask[top : top + block_h, left : left + block_w]
                new = int(window.size - window.sum())
                if 0 < new <= remaining:
                    window[...] = True
                    added = new
                    break
            if added == 0:
                break
            count += added
        return mask.reshape(-1)

    def sample(self, ratio: tuple[float, float], probability: float, rng: np.random.Generator) -> np.ndarray:
        """Mask a crop with ``probability``, at a fraction of patches uniform in ``ratio``."""
        if rng.random() >= probability:
            return np.zeros(self.n_patches, dtype=bool)
        return self(int(self.n_patches * rng.uniform(*ratio)), rng)
