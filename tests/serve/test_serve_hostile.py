"""Hostile inputs get their status and the server stays healthy afterwards.

Every case ends by checking ``/health`` and a valid request on the same server, so a case that broke
the server fails its own test rather than a later one.
"""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import FETCH_MAX_BYTES, MAX_BODY_BYTES, MAX_ROWS
from .serve_harness import b64, png_declaring, score_body


@pytest.fixture
def healthy_after(server, tiles):
    """Check after the test that the shared server still responds and embeds."""
    yield
    assert server.client.get("/health").status_code == 200
    response = server.score(score_body([b64(tiles["tile0.png"])]))
    assert response.status_code == 200, response.text
    assert np.isfinite(response.json()[0]["output"]).all()


def assert_error(response, status: int, code: str | None = None, row: int | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert payload["status"] == status
    if code is not None:
        assert payload["code"] == code
    assert payload["row"] == row
    assert payload["message"]
    assert payload["request_id"] == response.headers["x-request-id"]
    return payload


@pytest.mark.usefixtures("healthy_after")
class TestRequestShape:
    def test_invalid_json(self, server):
        response = server.client.post("/score", content=b'{"input_data": [', headers={"content-type": "application/json"})
        assert_error(response, 400, "invalid_json")

    def test_body_not_utf8(self, server):
        assert_error(server.client.post("/score", content=b"\xff\xfe{}"), 400, "invalid_json")

    def test_missing_input_data(self, server):
        payload = assert_error(server.score({"params": {}}), 422, "invalid_request")
        assert "input_data" in payload["message"]

    def test_wrong_column_name(self, server, tiles):
        body = score_body([b64(tiles["tile0.png"])])
        body["input_data"]["columns"] = ["img"]
        payload = assert_error(server.score(body), 422, "invalid_columns")
        assert '["img"]' in payload["message"]

    def test_empty_data(self, server):
        assert_error(server.score({"input_data": {"columns": ["image"], "data": []}}), 422, "no_rows")

    def test_unknown_param(self, server, tiles):
        body = score_body([b64(tiles["tile0.png"])], params={"embeding": "cls"})
        payload = assert_error(server.score(body), 422, "invalid_request")
        assert "embeding" in payload["message"]

    def test_row_with_two_values(self, server, tiles):
        body = score_body([b64(tiles["tile0.png"])])
        body["input_data"]["data"] = [[b64(tiles["tile0.png"])], ["a", "b"]]
        body["input_data"]["index"] = [0, 1]
        assert_error(server.score(body), 422, "invalid_request", row=1)

    def test_row_not_a_string(self, server):
        body = {"input_data": {"columns": ["image"], "data": [["x"], [42]]}}
        assert_error(server.score(body), 422, "invalid_request", row=1)

    def test_index_length_mismatch(self, server, tiles):
        body = score_body([b64(tiles["tile0.png"])])
        body["input_data"]["index"] = [0, 1]
        assert_error(server.score(body), 422, "invalid_index")

    def test_more_rows_than_limit(self, server):
        payload = assert_error(server.score(score_body(["x"] * (MAX_ROWS + 1))), 413, "too_many_rows")
        assert str(MAX_ROWS) in payload["message"]

    def test_oversized_body_with_length(self, server):
        body = b'{"input_data": {"data": ["' + b"A" * (MAX_BODY_BYTES + 1000) + b'"]}}'
        assert_error(server.client.post("/score", content=body), 413, "body_too_large")

    def test_oversized_body_streamed(self, server):
        def chunks():
            yield b'{"input_data": {"data": ["'
            for _ in range(MAX_BODY_BYTES // 65536 + 2):
                yield b"A" * 65536
            yield b'"]}}'

        response = server.client.post("/score", content=chunks())
        assert "content-length" not in response.request.headers
        assert_error(response, 413, "body_too_large")

    def test_unknown_route(self, server):
        assert_error(server.client.get("/nope"), 404, "not_found")

    def test_wrong_method(self, server):
        assert_error(server.client.get("/score"), 405, "method_not_allowed")


@pytest.mark.usefixtures("healthy_after")
class TestImageRows:
    def test_invalid_base64(self, server, tiles):
        body = score_body([b64(tiles["tile0.png"]), "@@@ not base64 @@@"])
        payload = assert_error(server.score(body), 400, "invalid_base64", row=1)
        assert payload["errors"][0]["index"] == 1

    def test_non_image_bytes(self, server):
        payload = assert_error(server.score(score_body([b64(b"just some text, not an image")])), 415, row=0)
        assert "PNG" in payload["message"]

    def test_format_not_accepted(self, server, tiles):
        assert_error(server.score(score_body([b64(tiles["tile.gif"])])), 415, "unsupported_image_format", row=0)

    def test_truncated_png(self, server, tiles):
        truncated = tiles["tile0.png"][: len(tiles["tile0.png"]) // 2]
        assert_error(server.score(score_body([b64(truncated)])), 400, "invalid_image", row=0)

    def test_decompression_bomb_over_our_limit(self, server):
        bomb = png_declaring(5000, 5000)  # 25 Mpx: over max_image_pixels, under Pillow's own threshold
        assert len(bomb) < 200
        payload = assert_error(server.score(score_body([b64(bomb)])), 413, "image_too_many_pixels", row=0)
        assert "5000 x 5000" in payload["message"]

    def test_decompression_bomb_huge(self, server):
        bomb = png_declaring(100_000, 100_000)
        assert_error(server.score(score_body([b64(bomb)])), 413, "image_too_many_pixels", row=0)

    def test_all_failing_rows_listed(self, server, tiles):
        body = score_body(["@@@", b64(tiles["tile0.png"]), b64(b"text"), b64(png_declaring(5000, 5000))])
        payload = assert_error(server.score(body), 400, "invalid_base64", row=0)
        assert [(entry["row"], entry["status"]) for entry in payload["errors"]] == [(0, 400), (2, 415), (3, 413)]


@pytest.mark.usefixtures("healthy_after")
class TestUrlRows:
    @pytest.mark.parametrize(
        "url",
        [
            "http://127.0.0.1:{port}/tiles/tile0.png",
            "http://[::1]:{port}/tiles/tile0.png",
            "http://localhost:{port}/tiles/tile0.png",
            "http://127.0.0.2:{port}/tiles/tile0.png",
            "http://[::ffff:127.0.0.1]:{port}/tiles/tile0.png",
            "http://2130706433:{port}/tiles/tile0.png",
        ],
    )
    def test_loopback_without_allow_list(self, server, other_image_host, url):
        response = server.score(score_body([url.format(port=other_image_host.port)]))
        payload = assert_error(response, 400, "url_not_allowed", row=0)
        assert "loopback" in payload["message"]
        assert other_image_host.requests == []

    def test_allowed_host_wrong_port(self, server, image_host, other_image_host):
        # The allow-list names image_host's port only; the same address on another port stays rejected.
        url = f"http://127.0.0.1:{other_image_host.port}/tiles/tile0.png"
        assert_error(server.score(score_body([url])), 400, "url_not_allowed", row=0)
        assert other_image_host.requests == []

    def test_redirect_to_uncovered_loopback_port(self, server, image_host, other_image_host):
        target = other_image_host.url("/tiles/tile0.png")
        url = image_host.url(f"/redirect?to={target}")
        payload = assert_error(server.score(score_body([url])), 400, "url_not_allowed", row=0)
        assert str(other_image_host.port) in payload["message"]
        assert any(path.startswith("/redirect") for path, _host in image_host.requests)
        assert other_image_host.requests == []

    def test_redirect_to_metadata_address(self, server, image_host):
        url = image_host.url("/redirect?to=http://169.254.169.254/latest/meta-data/")
        payload = assert_error(server.score(score_body([url])), 400, "url_not_allowed", row=0)
        assert "cloud metadata" in payload["message"]

    def test_redirect_loop(self, server, image_host):
        url = image_host.url("/redirect?to=/redirect%3Fto%3D/redirect%253Fto%253D/redirect%25253Fto%25253D/x")
        assert_error(server.score(score_body([url])), 400, "too_many_redirects", row=0)

    def test_stalling_url_times_out(self, server, image_host):
        payload = assert_error(server.score(score_body([image_host.url("/stall")])), 504, "fetch_timeout", row=0)
        assert "1.5 s" in payload["message"]

    def test_body_over_size_cap(self, server, image_host):
        url = image_host.url(f"/big?bytes={FETCH_MAX_BYTES + 1}")
        assert_error(server.score(score_body([url])), 413, "image_too_large", row=0)

    def test_streamed_body_over_size_cap(self, server, image_host):
        url = image_host.url(f"/drip?bytes={FETCH_MAX_BYTES * 4}")
        payload = assert_error(server.score(score_body([url])), 413, "image_too_large", row=0)
        assert "larger than the limit" in payload["message"]

    def test_compressed_body_rejected(self, server, image_host):
        assert_error(server.score(score_body([image_host.url("/gzip")])), 415, "unsupported_content_encoding", row=0)

    def test_upstream_error_status(self, server, image_host):
        payload = assert_error(server.score(score_body([image_host.url("/status?code=404")])), 400, "fetch_failed", row=0)
        assert "HTTP 404" in payload["message"]

    def test_unsupported_scheme(self, server):
        # Not a URL row (no http prefix), so it is read as base64 and rejected there.
        assert_error(server.score(score_body(["file:///etc/passwd"])), 400, "invalid_base64", row=0)

    def test_url_with_credentials(self, server, image_host):
        url = f"http://user:secret@127.0.0.1:{image_host.port}/tiles/tile0.png"
        assert_error(server.score(score_body([url])), 400, "invalid_url", row=0)

    def test_metadata_host_name_not_resolved(self, server):
        assert_error(server.score(score_body(["http://metadata.google.internal/computeMetadata/v1/"])), 400, "url_not_allowed", row=0)


def test_fetch_metrics_count_rejections(server, other_image_host):
    server.score(score_body([f"http://127.0.0.1:{other_image_host.port}/x.png"]))
    text = server.client.get("/metrics").text
    assert 'virchow_serve_images_fetched_total{outcome="rejected"}' in text
