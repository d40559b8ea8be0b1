"""``virchow serve``: settings from flags, --set and the environment, and the command end to end."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from virchow.cli import serve as serve_command
from virchow.cli.serve import load_settings
from virchow.errors import ConfigError
from virchow.serve.settings import ServeSettings

from .serve_harness import b64, score_body


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("VIRCHOW_SERVE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults(clean_env):
    settings = load_settings(parse())
    assert settings.host == "127.0.0.1"
    assert settings.model == "virchow"
    assert settings.max_batch_size == 32
    assert settings.fetch_allow == ()
    assert settings.api_keys == ()


def test_flags_over_environment(clean_env):
    clean_env.setenv("VIRCHOW_SERVE_MODEL", "virchow2-test")
    clean_env.setenv("VIRCHOW_SERVE_MAX_ROWS", "5")
    clean_env.setenv("VIRCHOW_SERVE_PORT", "9001")
    settings = load_settings(parse("--model", "virchow-test", "--set", "max_rows=9", "--batch-size", "4"))
    assert settings.model == "virchow-test"
    assert settings.max_rows == 9
    assert settings.max_batch_size == 4
    assert settings.port == 9001


def test_list_settings_from_environment(clean_env):
    clean_env.setenv("VIRCHOW_SERVE_FETCH_ALLOW", "tiles.internal, 10.0.0.0/8")
    clean_env.setenv("VIRCHOW_SERVE_IMAGE_FORMATS", '["png", "jpg"]')
    clean_env.setenv("VIRCHOW_SERVE_API_KEYS", "key-one,key-two")
    settings = ServeSettings()
    assert settings.fetch_allow == ("tiles.internal", "10.0.0.0/8")
    assert settings.image_formats == ("PNG", "JPEG")
    assert [key.get_secret_value() for key in settings.api_keys] == ["key-one", "key-two"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--set", "max_rows=zero"), "max_rows"),
        (("--set", "no_such_setting=1"), "no_such_setting"),
        (("--set", "max_rows"), "NAME=VALUE"),
        (("--set", "fetch_allow=http://x"), "fetch_allow"),
        (("--set", "image_formats=PNG,HEIC9"), "image_formats"),
        (("--set", "max_rows=500"), "max_pending_images"),
        (("--port", "70000"), "port"),
    ],
)
def test_invalid_settings(clean_env, argv, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(parse(*argv))


def test_print_settings_masks_keys(clean_env, capsys):
    clean_env.setenv("VIRCHOW_SERVE_API_KEYS", "very-secret-key")
    assert serve_command.run(parse("--print-settings", "--set", "max_rows=3")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["max_rows"] == 3
    assert printed["api_keys"] == ["<1 keys>"]
    assert "very-secret-key" not in json.dumps(printed)


def test_load_failure_exits_with_error(clean_env, tmp_path):
    args = parse("--model", "virchow-test", "--weights", str(tmp_path / "absent"), "--device", "cpu", "--port", "0")
    assert serve_command.run(args) == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_command_serves_and_stops_on_sigterm(clean_env, tiles):
    port = free_port()
    command = [sys.executable, "-m", "virchow", "serve", "--model", "virchow-test", "--weights", "random:0"]
    command += ["--device", "cpu", "--precision", "fp32", "--port", str(port), "--set", "max_rows=4"]
    env = {**os.environ, "VIRCHOW_SERVE_API_KEYS": "cli-test-key"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as client:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, process.stderr.read()
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "virchow serve did not become ready"
                time.sleep(0.2)
            headers = {"Authorization": "Bearer cli-test-key"}
            response = client.post("/score", json=score_body([b64(tiles["tile0.png"])]), headers=headers)
            assert response.status_code == 200
            assert len(response.json()[0]["output"]) == 320
            assert client.post("/score", json=score_body(["x"] * 5), headers=headers).status_code == 413
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status reports the signal.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        log = process.stderr.read()
        assert "embedding service stopped" in log
        assert "cli-test-key" not in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
