"""The Azure ML scoring script: init() and run() directly, and served by azureml-inference-server-http.

The server test needs the ``azureml-inference-server-http`` package, which pulls Flask and gunicorn and
is kept out of the project environment. It runs when that package is importable here, or when
``VIRCHOW_AZUREML_PYTHON`` names the Python of a separate environment that has it (the same Python
version as this one, since the project's own packages are added to its path), for example::

    python3.11 -m venv /tmp/azml-venv && /tmp/azml-venv/bin/pip install azureml-inference-server-http
    VIRCHOW_AZUREML_PYTHON=/tmp/azml-venv/bin/python pytest tests/serve -m slow
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import virchow.serve.scoring as scoring
from virchow.errors import ConfigError
from virchow.models import get_model_spec
from virchow.models.export import save_pretrained
from virchow.serve.errors import FailedRowsError, PayloadTooLargeError

from .serve_harness import b64, score_body

SRC = Path(scoring.__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, embedder) -> Path:
    """An Azure-style model folder: the registered model's files a few levels below the mount point."""
    root = tmp_path_factory.mktemp("azureml-model")
    save_pretrained(embedder.model, get_model_spec("virchow-test"), root / "virchow-test" / "1")
    return root


@pytest.fixture
def scoring_env(monkeypatch, model_dir):
    for name in list(os.environ):
        if name.startswith("VIRCHOW_SERVE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("VIRCHOW_SERVE_DEVICE", "cpu")
    monkeypatch.setenv("VIRCHOW_SERVE_PRECISION", "fp32")
    monkeypatch.setenv("VIRCHOW_SERVE_MAX_ROWS", "4")
    yield monkeypatch
    scoring._service = None


def test_init_finds_weights_and_model(scoring_env, model_dir):
    scoring.init()
    service = scoring._service
    assert service is not None
    assert service.settings.model == "virchow-test"
    assert service.settings.weights == str(model_dir / "virchow-test" / "1")
    assert service.embedder.provenance.random is False


def test_run_matches_virchow_serve(scoring_env, server, tiles):
    body = score_body([b64(tiles["tile0.png"]), b64(tiles["tile.tif"]), b64(tiles["tile.jpg"])])
    scoring.init()
    result = scoring.run(json.dumps(body))
    served = server.score(body).json()
    assert [len(row["output"]) for row in result] == [320, 320, 320]
    assert np.abs(np.array([row["output"] for row in result]) - np.array([row["output"] for row in served])).max() <= 1e-6


def test_run_half_precision_and_kind(scoring_env, tiles):
    scoring.init()
    image = b64(tiles["tile1.png"])
    full = np.array(scoring.run(json.dumps(score_body([image])))[0]["output"])
    half = np.array(scoring.run(json.dumps(score_body([image], params={"to_half_precision": True})))[0]["output"])
    cls = np.array(scoring.run(json.dumps(score_body([image], params={"embedding": "cls"})))[0]["output"])
    assert np.array_equal(half, full.astype(np.float16).astype(np.float64))
    assert np.abs(cls - full[:160]).max() <= 1e-6


def test_run_raises_client_errors_without_azure_server(scoring_env, tiles):
    if importlib.util.find_spec("azureml_inference_server_http") is not None:
        pytest.skip("with Azure's server installed, run() returns an AMLResponse instead of raising")
    scoring.init()
    with pytest.raises(FailedRowsError) as error:
        scoring.run(json.dumps(score_body([b64(tiles["tile0.png"]), "@@"])))
    assert error.value.status == 400
    assert error.value.row == 1
    with pytest.raises(PayloadTooLargeError):
        scoring.run(json.dumps(score_body(["x"] * 5)))


def test_run_before_init():
    scoring._service = None
    with pytest.raises(RuntimeError, match="init"):
        scoring.run("{}")


def test_weights_directory_search(tmp_path, model_dir):
    assert scoring.find_weights_directory(model_dir) == model_dir / "virchow-test" / "1"
    with pytest.raises(ConfigError, match="no config.json"):
        scoring.find_weights_directory(tmp_path)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="several"):
        scoring.find_weights_directory(tmp_path)


def azureml_python() -> str | None:
    configured = os.environ.get("VIRCHOW_AZUREML_PYTHON")
    if configured:
        return configured
    if importlib.util.find_spec("azureml_inference_server_http") is not None:
        return sys.executable
    return None


# Runs Azure's command line with its listen address changed from 0.0.0.0 to 127.0.0.1. The project's
# packages are appended to sys.path, after the server environment's own.
_BOOTSTRAP = """
import sys
sys.path.append({site!r})
sys.path.insert(0, {src!r})
from azureml_inference_server_http import amlserver
amlserver.DEFAULT_HOST = "127.0.0.1"
sys.argv = ["azmlinfsrv", "--entry_script", {script!r}, "--model_dir", {model_dir!r}, "--port", "{port}"]
amlserver.run()
"""


@pytest.mark.slow
def test_azure_inference_server_matches_virchow_serve(model_dir, server, tiles, tmp_path):
    python = azureml_python()
    if python is None:
        pytest.skip("azureml-inference-server-http is not installed; set VIRCHOW_AZUREML_PYTHON (see module docstring)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bootstrap = _BOOTSTRAP.format(
        site=sysconfig.get_paths()["purelib"], src=str(SRC), script=scoring.__file__, model_dir=str(model_dir), port=port
    )
    dropped = ("VIRCHOW_SERVE_", "PYTHON", "AML_APP_INSIGHTS", "APPLICATIONINSIGHTS")
    env = {name: value for name, value in os.environ.items() if not name.startswith(dropped)}
    env.update(
        VIRCHOW_SERVE_DEVICE="cpu",
        VIRCHOW_SERVE_PRECISION="fp32",
        VIRCHOW_SERVE_MAX_ROWS="4",
        WORKER_TIMEOUT="120",
        AML_APP_INSIGHTS_ENABLED="false",  # telemetry would send data outside this machine
    )
    log_path = tmp_path / "azmlinfsrv.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([python, "-c", bootstrap], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        body = score_body([b64(tiles["tile0.png"]), b64(tiles["tile.tif"])])
        with httpx.Client(base_url=base, trust_env=False, timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, log_path.read_text()[-3000:]
                try:
                    response = client.post("/score", json=body)
                    if response.status_code != 502:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
            assert response.status_code == 200, response.text
            azure = np.array([row["output"] for row in response.json()])
            ours = np.array([row["output"] for row in server.score(body).json()])
            assert azure.shape == (2, 320)
            assert np.abs(azure - ours).max() <= 1e-6

            invalid = client.post("/score", json=score_body([b64(tiles["tile0.png"]), "@@"]))
            assert invalid.status_code == 400
            assert invalid.json()["code"] == "invalid_base64"
            assert invalid.json()["row"] == 1
            assert client.post("/score", json=score_body(["x"] * 5)).status_code == 413
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
