"""virchow: the Virchow pathology foundation model as a practical toolkit.

Virchow is a ViT-H/14 trained with a DINOv2-style objective on 1.5 million H&E whole-slide images
(Vorontsov et al., "A foundation model for clinical-grade computational pathology and rare cancers
detection", Nature Medicine 2024, https://doi.org/10.1038/s41591-024-03141-0).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("virchow")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
