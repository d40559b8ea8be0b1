"""Ray engine settings without a cluster: replica layout, command-line mapping, and Ray missing."""

from __future__ import annotations

import sys

import pytest

from virchow.cli import embed_slides as embed_slides_command
from virchow.cli.main import build_parser, main
from virchow.distributed import EmbedderSpec, RayEngineOptions, plan_replica_layout
from virchow.errors import ConfigError, MissingExtraError

from .conftest import SAMPLE, TEST_MODEL


def _layout(nodes, device="auto", **options):
    return plan_replica_layout(EmbedderSpec(device=device), RayEngineOptions(**options), 2, nodes)


def test_layout_one_replica_per_gpu():
    layout = _layout([{"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 4}])
    assert layout.count == 8
    assert layout.num_gpus == 1
    assert layout.num_cpus == 3  # the model thread plus two read threads
    assert layout.device == "cuda"
    assert layout.torch_threads is None


def test_layout_cpu_replicas_fill_nodes():
    layout = _layout([{"CPU": 16}, {"CPU": 8}, {"CPU": 2}])
    assert layout.count == 6  # 4 + 2 replicas of 4 CPUs; the 2-CPU node fits none
    assert layout.num_cpus == 4
    assert layout.num_gpus == 0
    assert layout.device == "cpu"
    assert layout.torch_threads == 4


def test_layout_small_nodes_and_overrides():
    assert _layout([{"CPU": 1}, {"CPU": 1}]).count == 2
    custom = _layout([{"CPU": 16}], replicas=3, cpus_per_replica=2)
    assert (custom.count, custom.num_cpus, custom.torch_threads) == (3, 2, 2)
    # --device cpu keeps a GPU cluster's replicas on CPUs.
    assert _layout([{"CPU": 8, "GPU": 2}], device="cpu").num_gpus == 0


@pytest.mark.parametrize(
    ("nodes", "device", "message"),
    [
        ([{"CPU": 8, "GPU": 2}], "cuda:1", "Ray assigns one GPU"),
        ([{"CPU": 8}], "cuda", "has no GPUs"),
        ([{"GPU": 1, "CPU": 0}], "cpu", "no CPUs"),
    ],
)
def test_layout_rejects_unusable_devices(nodes, device, message):
    with pytest.raises(ConfigError, match=message):
        _layout(nodes, device=device)


def test_options_reject_invalid_values():
    with pytest.raises(ConfigError, match="replicas"):
        RayEngineOptions(replicas=0)
    with pytest.raises(ConfigError, match="slides per replica"):
        RayEngineOptions(slides_per_replica=0)


def test_options_and_spec_from_cli_arguments():
    args = build_parser().parse_args(["embed-slides", str(SAMPLE), "--out", "out", *TEST_MODEL,
                                      "--engine", "ray", "--ray-address", "127.0.0.1:6379"])
    options = RayEngineOptions.from_args(args)
    spec = EmbedderSpec.from_args(args)

    assert options.address == "127.0.0.1:6379"
    assert options.replicas is None
    assert options.max_slide_retries == RayEngineOptions().max_slide_retries
    assert spec == EmbedderSpec("virchow-test", "random:0", device="cpu", precision="fp32", batch_size=16)


def test_engine_ray_without_ray_names_the_extra(monkeypatch, tmp_path, caplog):
    # A None entry in sys.modules makes `import ray` raise ImportError, as when Ray is not installed.
    monkeypatch.setitem(sys.modules, "ray", None)
    for name in [name for name in sys.modules if name.startswith("virchow.distributed.")]:
        monkeypatch.delitem(sys.modules, name)
    argv = ["embed-slides", str(SAMPLE), "--out", str(tmp_path), *TEST_MODEL, "--engine", "ray"]

    with pytest.raises(MissingExtraError, match=r"pip install 'virchow\[ray\]'"):
        embed_slides_command.run(build_parser().parse_args(argv))
    assert main(argv) == 1
    assert "pip install 'virchow[ray]'" in caplog.text
    assert not (tmp_path / "features").exists()
