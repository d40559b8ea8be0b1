"""One model replica of the Ray engine: a process that plans, reads and embeds whole slides.

:mod:`virchow.distributed.ray_engine` runs :class:`EmbedReplica` as a Ray actor with one GPU, or
with a share of a node's CPUs. Tiles are read by the :class:`~virchow.pipeline.tile_stream.TileStream`
threads of the replica process (the CPUs reserved next to the GPU), so pixels go from the slide
file to the model without passing through the Ray object store. The class itself does not
import Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virchow.distributed.options import EmbedderSpec
from virchow.io.h5 import remove_stale_temporaries
from virchow.pipeline.config import SlideJobConfig
from virchow.pipeline.inputs import SlideInput
from virchow.pipeline.manifest import SlideOutcome
from virchow.pipeline.runner import process_slide
from virchow.pipeline.slide import FEATURES_DIR

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaInfo:
    """Location and embedder of a running replica.

    Attributes:
        host: host name of the replica's node.
        pid: process id of the replica (changes when Ray restarts it).
        device: the torch device of the model.
        torch_threads: intra-op threads of torch in the replica.
        metadata: :meth:`Embedder.metadata`, from which the settings fingerprint is computed.
    """

    host: str
    pid: int
    device: str
    torch_threads: int
    metadata: dict[str, Any]


class EmbedReplica:
    """Load a model once and embed slides into ``out_dir`` with it, as the local engine does.

    Args:
        spec: how to build the embedder on this replica's device.
        out_dir: the job's output folder, on storage that every node sees at the same path.
        config: tiling and storage settings.
        log_level: level of the ``virchow`` loggers in this process (Ray forwards its stderr
            to the driver).
        torch_threads: intra-op threads for torch, or None to keep torch's default.
    """

    def __init__(
        self,
        spec: EmbedderSpec,
        out_dir: str,
        config: SlideJobConfig,
        *,
        log_level: int = logging.WARNING,
        torch_threads: int | None = None,
    ) -> None:
        _configure_logging(log_level)
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        self._out_dir = Path(out_dir)
        self._config = config
        # A replica that Ray restarts after a crash finds the temporary file of its previous process here.
        features_dir = self._out_dir / FEATURES_DIR
        if features_dir.is_dir():
            for stale in remove_stale_temporaries(features_dir):
                _logger.warning("removed %s, left by a dead worker on this host", stale.name)
        self._embedder = spec.build()
        # Several slides may be in flight: they are planned concurrently but embedded one at a time.
        self._model_lock = threading.Lock()

    def describe(self) -> ReplicaInfo:
        """Return where this replica runs and its embedder metadata; the driver also uses it as a readiness check."""
        import torch

        return ReplicaInfo(
            host=socket.gethostname(),
            pid=os.getpid(),
            device=str(self._embedder.device),
            torch_threads=torch.get_num_threads(),
            metadata=self._embedder.metadata(),
        )

    def embed_slide(self, slide: SlideInput, fingerprint: str) -> SlideOutcome:
        """Plan, read and embed one slide into ``OUT/features/<slide_id>.h5`` (written atomically).

        Failures of the slide itself come back as a failed outcome, as in the local engine. Only
        the death of this process (or its node) surfaces on the driver as a Ray error.
        """
        outcome = process_slide(
            slide, self._out_dir, self._embedder, self._config, fingerprint, progress=False, embed_guard=self._model_lock
        )
        outcome.host = socket.gethostname()
        outcome.pid = os.getpid()
        return outcome


def _configure_logging(level: int) -> None:
    """Send this worker process's ``virchow`` log records to stderr, which Ray forwards to the driver."""
    logger = logging.getLogger("virchow")
    logger.setLevel(level)
    if not any(getattr(handler, "_virchow_replica", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._virchow_replica = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
