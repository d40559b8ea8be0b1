"""Image preprocessing: defined colour handling, the official transform and a fast tensor path.

The official transform is timm's, resolved from the published pretrained config exactly as the
model card does: bicubic resize of the short side to 224 with antialiasing, centre crop to 224,
scaling to [0, 1] and ImageNet normalisation. A tile that is already 224 x 224 passes the resize
and the crop unchanged, so :func:`tiles_to_tensor` skips them and normalises uint8 tiles on the
target device in one step; the two paths give the same numbers (tested).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from virchow.errors import ImageDecodeError
from virchow.models.registry import PreprocessConfig

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparent pixels (RGBA, LA, PA, or P and L images with a transparency key) are composited on
    white, as an empty slide background is white. 16-bit and 32-bit integer images are scaled from
    their full range, float images are taken as [0, 1] when their maximum is at most 1 and as
    [0, 255] otherwise. CMYK, YCbCr, LAB and HSV are converted by Pillow's colour conversions.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("P", "L", "LA", "PA", "1") and ("transparency" in image.info or mode in ("LA", "PA")):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", image.size, _WHITE)
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if mode.startswith("I;16") or mode == "I":
        return _array_to_rgb(np.asarray(image))
    if mode == "F":
        return _array_to_rgb(np.asarray(image, dtype=np.float32))
    return image.convert("RGB")


def array_to_image(array: np.ndarray) -> Image.Image:
    """Convert an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array of any numeric dtype to RGB.

    Raises:
        ImageDecodeError: the array does not have one of those shapes.
    """
    return _array_to_rgb(np.asarray(array))


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageDecodeError(f"cannot use an array of shape {array.shape} as an image: expected (H, W), (H, W, 3) or (H, W, 4)")
    array = _to_uint8(array)
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.shape[2] == 4:
        return to_rgb(Image.fromarray(array, mode="RGBA"))
    return Image.fromarray(array, mode="RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        finite = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if finite.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.rint(finite * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        max_value = 65535 if array.dtype.itemsize <= 2 else max(int(array.max(initial=0)), 1)
        scaled = array.astype(np.float64) * (255.0 / max_value)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    raise ImageDecodeError(f"unsupported array dtype {array.dtype} for an image")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file and return it as 8-bit RGB.

    TIFF files that Pillow cannot decode (for example 16-bit RGB) are read with tifffile.

    Raises:
        ImageDecodeError: the file is missing, truncated or not an image; the message names it.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
            try:
                import tifffile

                return array_to_image(tifffile.imread(path))
            except Exception as tiff_exc:  # tifffile raises many types for corrupt files
                raise ImageDecodeError(f"cannot decode image {path}: {exc}; tifffile: {tiff_exc}") from tiff_exc
        raise ImageDecodeError(f"cannot decode image {path}: {exc}") from exc


class OfficialTransform:
    """The official PIL-to-tensor transform, built by timm from the pretrained config.

    Instances are picklable, so DataLoader workers can run them.
    """

    def __init__(self, config: PreprocessConfig) -> None:
        from timm.data import create_transform, resolve_data_config

        data_config = resolve_data_config(
            {
                "input_size": (3, config.input_size, config.input_size),
                "interpolation": config.interpolation,
                "crop_pct": config.crop_pct,
                "crop_mode": "center",
                "mean": config.mean,
                "std": config.std,
            }
        )
        self.transform = create_transform(**data_config)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(image))

    def __repr__(self) -> str:
        return f"OfficialTransform({self.transform})"


def build_transform(config: PreprocessConfig) -> OfficialTransform:
    """Return the official transform for ``config``."""
    return OfficialTransform(config)


def tiles_to_tensor(
    tiles: np.ndarray | torch.Tensor, config: PreprocessConfig, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Normalise a batch of uint8 RGB tiles on ``device``.

    Args:
        tiles: (B, H, W, 3) numpy or torch uint8 (channels last, as slide readers return them) or
            (B, 3, H, W) torch uint8. H and W must equal ``config.input_size``.
        config: preprocessing of the model.
        device: where the result is placed; the conversion runs there.

    Returns:
        (B, 3, H, W) float32, scaled to [0, 1] and normalised with the model's mean and std.
    """
    if isinstance(tiles, np.ndarray):
        tiles = np.ascontiguousarray(tiles)
        batch = torch.from_numpy(tiles if tiles.flags.writeable else tiles.copy())
    else:
        batch = tiles
    if batch.dtype != torch.uint8:
        raise ImageDecodeError(f"tiles must be uint8, got {batch.dtype}")
    if batch.ndim != 4:
        raise ImageDecodeError(f"tiles must be a batch of shape (B, H, W, 3) or (B, 3, H, W), got {tuple(batch.shape)}")
    if batch.shape[-1] == 3 and batch.shape[1] != 3:
        batch = batch.permute(0, 3, 1, 2)
    size = config.input_size
    if tuple(batch.shape[1:]) != (3, size, size):
        raise ImageDecodeError(
            f"tiles must be 3 x {size} x {size}, got {tuple(batch.shape[1:])}: use the PIL transform for other sizes"
        )
    batch = batch.to(device, non_blocking=True).float().div_(255.0)
    mean = torch.tensor(config.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=batch.device).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std)
