"""Fixtures of the Ray engine tests: a real two-node Ray cluster on 127.0.0.1 and slide folders.

Ray rewrites 127.0.0.1 in ``ray.init`` addresses to the host's routable IP unless it runs in
single-host mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when Ray is imported). The tests
set that mode so that every Ray connection stays on the loopback interface, which is why the
variable is set here, before any test module imports Ray.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Ray's memory monitor kills workers when the host's memory use passes 95%, counting every process
# on the host. On a shared test machine that would kill replicas at random and make the death counts flaky.
os.environ["RAY_memory_monitor_refresh_ms"] = "0"  # noqa: SIM112 (Ray reads its config names case-sensitively)

WSI = Path(__file__).parents[1] / "data" / "wsi"
SAMPLE = WSI / "CMU-1-Small-Region.svs"
# Small nodes keep the cluster light on a 2-core machine; 100 MB is above Ray's minimum object store.
NODE_ARGS = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024 * 1024}
TEST_MODEL = ["--model", "virchow-test", "--weights", "random:0", "--device", "cpu", "--precision", "fp32",
              "--batch-size", "16"]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """A head node and one worker node (1 CPU each) on 127.0.0.1, with this process connected as the driver."""
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # NOTE: a private constant; it matters only when Ray was imported before this file set the variable.
    ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False})
    try:
        cluster.add_node(**NODE_ARGS)
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def copy_slides(folder: Path, names: list[str], *, broken: bool = False) -> Path:
    """Fill ``folder`` with copies of the sample slide named ``<name>.svs`` (and ``broken.svs``)."""
    folder.mkdir(parents=True)
    for name in names:
        shutil.copyfile(SAMPLE, folder / f"{name}.svs")
    if broken:
        shutil.copyfile(WSI / "broken.svs", folder / "broken.svs")
    return folder
