"""Embedding whole slides on a Ray cluster (``virchow embed-slides --engine ray``).

This package needs the optional extra ``pip install 'virchow[ray]'``. Its options are importable
without Ray. The engine itself is in :mod:`virchow.distributed.ray_engine`, which imports Ray.
"""

from virchow.distributed.options import EmbedderSpec as EmbedderSpec
from virchow.distributed.options import RayEngineOptions as RayEngineOptions
from virchow.distributed.options import ReplicaLayout as ReplicaLayout
from virchow.distributed.options import plan_replica_layout as plan_replica_layout

__all__ = ["EmbedderSpec", "RayEngineOptions", "ReplicaLayout", "plan_replica_layout"]
