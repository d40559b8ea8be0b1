"""API keys: 401 without or with a wrong key, 200 with the right one, and no key or payload in the logs."""

from __future__ import annotations

import logging

import pytest

from virchow.errors import ConfigError
from virchow.serve.auth import ApiKeyAuth, read_key_file
from virchow.serve.errors import UnauthorizedError

from .serve_harness import b64, score_body

KEY = "vk-test-6f1c0e2d9b8a47f3a1c2d3e4f5a6b7c8"
FILE_KEY = "vk-file-0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d"


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(f"# service keys\n\n{FILE_KEY}\n")
    return path


@pytest.fixture
def auth_server(server_factory, key_file, image_host):
    return server_factory(api_keys=(KEY,), api_keys_file=key_file, fetch_allow=(f"127.0.0.1:{image_host.port}",))


def test_missing_key_rejected(auth_server, tiles):
    response = auth_server.score(score_body([b64(tiles["tile0.png"])]))
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "header",
    [f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer", f"Basic {KEY}", KEY, f"Bearer {KEY.upper()}"],
    ids=["extra character", "prefix", "no token", "basic scheme", "no scheme", "wrong case"],
)
def test_wrong_key_rejected(auth_server, tiles, header):
    response = auth_server.score(score_body([b64(tiles["tile0.png"])]), headers={"Authorization": header})
    assert response.status_code == 401


@pytest.mark.parametrize("key", [KEY, FILE_KEY], ids=["setting", "file"])
def test_right_key_accepted(auth_server, tiles, key):
    response = auth_server.score(score_body([b64(tiles["tile0.png"])]), headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert len(response.json()) == 1


def test_probes_open_and_metrics_protected(auth_server):
    assert auth_server.client.get("/health").status_code == 200
    assert auth_server.client.get("/ready").status_code == 200
    assert auth_server.client.get("/").status_code == 200
    assert auth_server.client.get("/metrics").status_code == 401
    assert auth_server.client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_auth_checked_before_body_is_read(auth_server):
    response = auth_server.client.post("/score", content=b"{not json")
    assert response.status_code == 401


def test_keys_and_payloads_never_logged(auth_server, image_host, tiles, caplog):
    caplog.set_level(logging.DEBUG)
    payload = b64(tiles["tile3.png"])
    secret_query = "sig=sv2024-SECRET-TOKEN-31415"
    headers = {"Authorization": f"Bearer {KEY}"}
    wrong = {"Authorization": f"Bearer {FILE_KEY}-wrong"}
    auth_server.score(score_body([payload]), headers=headers)
    auth_server.score(score_body([payload]), headers=wrong)
    auth_server.score(score_body([payload, "@@bad@@"]), headers=headers)
    auth_server.score(score_body([payload], params={"device_type": "cuda"}), headers=headers)
    fetched = auth_server.score(score_body([image_host.url(f"/tiles/tile0.png?{secret_query}")]), headers=headers)
    failed = auth_server.score(score_body([image_host.url(f"/status?code=500&{secret_query}")]), headers=headers)
    rejected = auth_server.score(score_body([f"http://127.0.0.1:1/tile.png?{secret_query}"]), headers=headers)
    assert [fetched.status_code, failed.status_code, rejected.status_code] == [200, 400, 400]

    text = "\n".join(record.getMessage() for record in caplog.records) + caplog.text
    assert caplog.records, "expected the server to log requests and errors"
    for secret in (KEY, FILE_KEY, payload[:64], payload[-64:], secret_query):
        assert secret not in text
    assert "invalid API key" in text  # the 401 itself is logged, without the key


def test_key_file_comments_and_blanks(key_file):
    assert read_key_file(key_file) == [FILE_KEY]


def test_missing_key_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the API key file"):
        read_key_file(tmp_path / "absent.txt")


def test_auth_disabled_without_keys():
    auth = ApiKeyAuth([])
    assert not auth.enabled
    auth.check(None)


def test_key_with_whitespace_rejected():
    with pytest.raises(ConfigError):
        ApiKeyAuth(["two words"])


def test_malformed_header_message():
    auth = ApiKeyAuth([KEY])
    with pytest.raises(UnauthorizedError, match="Bearer"):
        auth.check("Token abc")
