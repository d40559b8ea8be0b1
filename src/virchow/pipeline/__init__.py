"""The whole-slide embedding pipeline behind ``virchow embed-slides``.

Inputs are discovered and validated (:mod:`.inputs`), each slide is planned (resolution, tissue,
tiles) and embedded with region reads overlapped with compute (:mod:`.slide`, :mod:`.tile_stream`),
and the run loop (:mod:`.runner`) adds resumption, locking between workers and a manifest.
"""

from virchow.pipeline.config import SlideJobConfig
from virchow.pipeline.inputs import SlideInput, discover_slides
from virchow.pipeline.runner import RunSummary, embed_slides

__all__ = ["RunSummary", "SlideInput", "SlideJobConfig", "discover_slides", "embed_slides"]
