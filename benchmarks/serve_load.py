"""Bounded load test of ``virchow serve`` against the offline batch throughput of the same model.

The script measures, in one run:

1. offline throughput: ``Embedder.embed`` over decoded tiles in batches of ``--max-batch-size``, and
   the model alone on tensors transformed beforehand (the ceiling for any server on the device);
2. served throughput: ``--clients`` concurrent clients send ``--images-per-request`` base64 tiles per
   request to a server this script starts on 127.0.0.1, until ``--requests`` requests have responses or
   ``--max-seconds`` have passed;
3. optionally (``--overload-clients``), a phase against a server with a tiny queue, where 503 responses
   are the intended outcome and are counted apart from errors.

It prints a Markdown table: throughput in images per second, its ratio to both offline figures,
latency percentiles of successful requests, the mean forward-pass batch and responses by status. All traffic stays on 127.0.0.1, and every phase stops by itself.

Usage (tiny test model, CPU; ``--write`` puts the table into docs/benchmarks.md):
    python -m benchmarks.serve_load --model virchow-test --weights random:0 --device cpu --precision fp32 [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

from benchmarks._report import machine_line, update_section

REPO = Path(__file__).resolve().parents[1]
TILES = REPO / "tests" / "data" / "tiles" / "labeled"
LOOPBACK = "127.0.0.1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="virchow-test", help="model variant (default: virchow-test)")
    parser.add_argument("--weights", default="random:0", help="weights (default: random:0)")
    parser.add_argument("--device", default="cpu", help="device (default: cpu)")
    parser.add_argument("--precision", default="fp32", help="precision (default: fp32)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="server and offline batch size (default: 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="server batch wait in ms (default: 5)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--images-per-request", type=int, default=4, help="rows per request (default: 4)")
    parser.add_argument("--requests", type=int, default=200, help="requests of the load phase (default: 200)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time limit of each phase (default: 120)")
    parser.add_argument("--offline-images", type=int, default=128, help="images per offline measurement (default: 128)")
    parser.add_argument(
        "--overload-clients", type=int, default=0, help="clients of the overload phase; 0 skips it (default: 0)"
    )
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    limits = {"--clients": args.clients, "--images-per-request": args.images_per_request, "--requests": args.requests}
    for name, value in limits.items():
        if not 1 <= value <= 10_000:
            parser.error(f"{name} must be between 1 and 10000, got {value}")
    if not 0 < args.max_seconds <= 3600:
        parser.error(f"--max-seconds must be in (0, 3600], got {args.max_seconds}")
    return args


def load_tiles() -> list[bytes]:
    paths = sorted(TILES.glob("*/*/*.png")) + sorted(TILES.glob("*/*/*.tif"))
    if not paths:
        raise SystemExit(f"no tiles found under {TILES}")
    return [path.read_bytes() for path in paths]


def measure_offline(args: argparse.Namespace, tiles: list[bytes]) -> tuple[float, float]:
    """Return images per second offline: ``Embedder.embed`` on decoded tiles, and the model alone.

    ``Embedder.embed`` applies the official transform and runs the model, as an offline job does.
    The model-only figure runs ``Embedder.embed_normalised`` on tensors transformed beforehand; it is
    the ceiling for any server on the same device. Both follow one warm-up batch.
    """
    import io

    import torch

    from virchow.embed import create_embedder
    from virchow.preprocess import build_transform

    embedder = create_embedder(
        args.model, args.weights, device=args.device, precision=args.precision, batch_size=args.max_batch_size, compile="off"
    )
    images = [Image.open(io.BytesIO(tiles[i % len(tiles)])).convert("RGB") for i in range(args.offline_images)]
    embedder.embed(images[: args.max_batch_size])

    def synchronize() -> None:
        if embedder.device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    embedder.embed(images)
    synchronize()
    embed_rate = len(images) / (time.perf_counter() - started)

    transform = build_transform(embedder.spec.preprocess)
    batch = torch.stack([transform(image) for image in images])
    started = time.perf_counter()
    embedder.embed_normalised(batch)
    synchronize()
    model_rate = len(images) / (time.perf_counter() - started)
    return embed_rate, model_rate


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


class ServerProcess:
    """``virchow serve`` in a subprocess on 127.0.0.1, stopped on exit."""

    def __init__(self, args: argparse.Namespace, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        command = [sys.executable, "-m", "virchow", "-q", "serve", "--host", LOOPBACK, "--port", str(self.port)]
        command += ["--model", args.model, "--weights", args.weights, "--device", args.device]
        command += ["--precision", args.precision, "--batch-size", str(args.max_batch_size)]
        command += ["--set", f"max_wait_ms={args.max_wait_ms}", "--set", "access_log=false", "--set", "fetch_urls=false"]
        for name, value in settings.items():
            command += ["--set", f"{name}={value}"]
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        self.process = subprocess.Popen(command, env=env)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(trust_env=False, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise SystemExit(f"virchow serve exited with status {self.process.returncode}")
                try:
                    if client.get(f"{self.url}/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise SystemExit(f"virchow serve was not ready within {timeout_s:.0f} s")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", trust_env=False, timeout=10).text

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class PhaseResult:
    name: str
    clients: int
    images_per_request: int
    latencies: list[float] = field(default_factory=list)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    transport_errors: int = 0
    seconds: float = 0.0

    @property
    def images_ok(self) -> int:
        return self.statuses[200] * self.images_per_request

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run_phase(
    name: str, url: str, bodies: list[bytes], *, clients: int, requests: int, max_seconds: float, images_per_request: int
) -> PhaseResult:
    """Send ``requests`` requests from ``clients`` concurrent clients, stopping early after ``max_seconds``."""
    result = PhaseResult(name=name, clients=clients, images_per_request=images_per_request)
    budget = iter(range(requests))
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"content-type": "application/json"}

    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=120, limits=limits) as client:

        async def worker(worker_id: int) -> None:
            for number in budget:
                if time.monotonic() > deadline:
                    return
                started = time.perf_counter()
                try:
                    response = await client.post("/score", content=bodies[number % len(bodies)], headers=headers)
                except httpx.TransportError:
                    result.transport_errors += 1
                    continue
                result.statuses[response.status_code] += 1
                if response.status_code == 200:
                    result.latencies.append(time.perf_counter() - started)
                    rows = json.loads(response.content)
                    if len(rows) != images_per_request:
                        raise SystemExit(f"expected {images_per_request} rows, got {len(rows)}")
                elif response.status_code == 503:
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")) / 10)

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        result.seconds = time.perf_counter() - started
    return result


def make_bodies(tiles: list[bytes], images_per_request: int, count: int = 32) -> list[bytes]:
    encoded = [base64.b64encode(tile).decode("ascii") for tile in tiles]
    bodies = []
    for start in range(count):
        rows = [[encoded[(start * images_per_request + i) % len(encoded)]] for i in range(images_per_request)]
        body = {"input_data": {"columns": ["image"], "index": list(range(images_per_request)), "data": rows}}
        bodies.append(json.dumps(body).encode())
    return bodies


def mean_batch_size(metrics_text: str) -> float:
    values = {}
    for line in metrics_text.splitlines():
        if line.startswith(("virchow_serve_batch_size_images_sum", "virchow_serve_batch_size_images_count")):
            name, value = line.split()
            values[name] = float(value)
    count = values.get("virchow_serve_batch_size_images_count", 0.0)
    return values.get("virchow_serve_batch_size_images_sum", 0.0) / count if count else float("nan")


def report(args: argparse.Namespace, offline: tuple[float, float], phases: list[tuple[PhaseResult, float]]) -> str:
    embed_rate, model_rate = offline
    lines = [
        "## `virchow serve` under load (benchmarks/serve_load.py)",
        "",
        f"Model `{args.model}` ({args.weights}) on {args.device} in {args.precision}, max batch {args.max_batch_size}, "
        f"max wait {args.max_wait_ms:g} ms, {args.images_per_request} images per request. Machine: {machine_line()}.",
        "",
        "| phase | clients | requests | img/s | / offline embed | / model only | p50 ms | p95 ms | p99 ms | mean batch | responses |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| offline `Embedder.embed` | - | - | {embed_rate:.1f} | 1.00 | {embed_rate / model_rate:.2f} | - | - | - "
        f"| {args.max_batch_size} | - |",
        f"| offline model only | - | - | {model_rate:.1f} | {model_rate / embed_rate:.2f} | 1.00 | - | - | - "
        f"| {args.max_batch_size} | - |",
    ]
    for phase, batch in phases:
        rate = phase.images_ok / phase.seconds if phase.seconds else 0.0
        responses = ", ".join(f"{status}: {count}" for status, count in sorted(phase.statuses.items()))
        if phase.transport_errors:
            responses += f", transport errors: {phase.transport_errors}"
        lines.append(
            f"| {phase.name} | {phase.clients} | {sum(phase.statuses.values())} | {rate:.1f} | {rate / embed_rate:.2f} "
            f"| {rate / model_rate:.2f} | {phase.percentile(50) * 1000:.0f} | {phase.percentile(95) * 1000:.0f} "
            f"| {phase.percentile(99) * 1000:.0f} | {batch:.1f} | {responses} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tiles = load_tiles()
    bodies = make_bodies(tiles, args.images_per_request)

    # The server runs the model on a worker thread, so the offline baseline does too. On a 2-core
    # machine shared with other jobs, PyTorch CPU ops ran about 2x slower on the main thread than on
    # a worker thread, which would flatter the server. The baseline is measured before and after the
    # served phase and the faster figures are kept, so a noisy neighbour cannot flatter the server either.
    model_thread = ThreadPoolExecutor(max_workers=1)
    print(f"offline: embedding {args.offline_images} tiles ...", file=sys.stderr)
    offline_runs = [model_thread.submit(measure_offline, args, tiles).result()]

    common = {"max_seconds": args.max_seconds, "images_per_request": args.images_per_request}
    phases = []
    server = ServerProcess(args)
    try:
        server.wait_ready()
        asyncio.run(run_phase("warm-up", server.url, bodies, clients=2, requests=8, **common))
        print(f"load: {args.clients} clients, {args.requests} requests ...", file=sys.stderr)
        result = asyncio.run(run_phase("served", server.url, bodies, clients=args.clients, requests=args.requests, **common))
        phases.append((result, mean_batch_size(server.metrics())))
    finally:
        server.stop()

    print("offline again ...", file=sys.stderr)
    offline_runs.append(model_thread.submit(measure_offline, args, tiles).result())
    model_thread.shutdown()
    offline = (max(run[0] for run in offline_runs), max(run[1] for run in offline_runs))

    if args.overload_clients:
        pending = 2 * args.images_per_request
        overloaded = ServerProcess(args, max_pending_images=pending, max_rows=args.images_per_request)
        try:
            overloaded.wait_ready()
            print(f"overload: {args.overload_clients} clients, queue of {pending} images ...", file=sys.stderr)
            result = asyncio.run(
                run_phase(
                    "overload (503 intended)",
                    overloaded.url,
                    bodies,
                    clients=args.overload_clients,
                    requests=args.requests,
                    **common,
                )
            )
            phases.append((result, mean_batch_size(overloaded.metrics())))
        finally:
            overloaded.stop()

    markdown = report(args, offline, phases)
    print(markdown)
    if args.write:
        print(f"wrote {update_section('serve_load', markdown)}", file=sys.stderr)
    served = phases[0][0]
    unexpected = sum(count for status, count in served.statuses.items() if status != 200) + served.transport_errors
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
