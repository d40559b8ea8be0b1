"""POST /score against a real uvicorn server: formats, URLs, row order, parameters and offline equality."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from .serve_harness import b64, score_body

TOLERANCE = 1e-6


def offline(embedder, files: list[bytes]) -> np.ndarray:
    return embedder.embed([Image.open(io.BytesIO(data)) for data in files])


def outputs(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["output"] for row in response.json()], dtype=np.float64)


def test_model_card_sample_shape(server, tiles):
    body = {"input_data": {"columns": ["image"], "index": [0], "data": [[b64(tiles["tile0.png"])]]}}
    response = server.score(body)
    assert response.status_code == 200
    payload = response.json()
    assert isinstance(payload, list)
    assert len(payload) == 1
    assert list(payload[0]) == ["output"]
    assert len(payload[0]["output"]) == 320  # cls+mean of the width-160 test model
    assert response.headers["x-virchow-embedding"] == "cls+mean"


@pytest.mark.parametrize("name", ["tile0.png", "tile.jpg", "tile.tif"])
def test_formats_match_offline_embedder(server, embedder, tiles, name):
    served = outputs(server.score(score_body([b64(tiles[name])])))
    expected = offline(embedder, [tiles[name]])
    assert served.shape == expected.shape
    assert np.abs(served - expected).max() <= TOLERANCE


def test_rows_keep_order(server, embedder, tiles):
    names = ["tile3.png", "tile0.png", "tile.tif", "tile5.png", "tile.jpg", "tile1.png"]
    served = outputs(server.score(score_body([b64(tiles[name]) for name in names])))
    expected = offline(embedder, [tiles[name] for name in names])
    assert served.shape == (6, 320)
    assert np.abs(served - expected).max() <= TOLERANCE


def test_flat_data_and_data_uri(server, embedder, tiles):
    images = [b64(tiles["tile0.png"]), "data:image/png;base64," + b64(tiles["tile1.png"])]
    served = outputs(server.score(score_body(images, nested=False)))
    expected = offline(embedder, [tiles["tile0.png"], tiles["tile1.png"]])
    assert np.abs(served - expected).max() <= TOLERANCE


def test_base64_with_line_breaks(server, embedder, tiles):
    import base64

    wrapped = base64.encodebytes(tiles["tile2.png"]).decode()
    served = outputs(server.score(score_body([wrapped])))
    assert np.abs(served - offline(embedder, [tiles["tile2.png"]])).max() <= TOLERANCE


def test_url_row_from_allowed_host(server, embedder, tiles, image_host):
    url = image_host.url("/tiles/tile4.png")
    served = outputs(server.score(score_body([url, b64(tiles["tile0.png"])])))
    expected = offline(embedder, [tiles["tile4.png"], tiles["tile0.png"]])
    assert np.abs(served - expected).max() <= TOLERANCE
    assert ("/tiles/tile4.png", f"127.0.0.1:{image_host.port}") in image_host.requests


def test_redirect_within_allowed_host(server, embedder, tiles, image_host):
    target = image_host.url("/tiles/tile.jpg")
    served = outputs(server.score(score_body([image_host.url(f"/redirect?to={target}")])))
    assert np.abs(served - offline(embedder, [tiles["tile.jpg"]])).max() <= TOLERANCE


def test_half_precision_rounds_outputs(server, embedder, tiles):
    params = {"device_type": "cuda", "to_half_precision": True}
    served = outputs(server.score(score_body([b64(tiles["tile0.png"])], params=params)))
    expected = offline(embedder, [tiles["tile0.png"]]).astype(np.float16).astype(np.float64)
    assert np.array_equal(served, expected)


def test_device_type_does_not_move_model(server, embedder, tiles):
    response = server.score(score_body([b64(tiles["tile0.png"])], params={"device_type": "cuda"}))
    assert response.status_code == 200
    assert embedder.device.type == "cpu"


@pytest.mark.parametrize(("kind", "columns"), [("cls", slice(0, 160)), ("mean", slice(160, 320))])
def test_embedding_kind_per_request(server, tiles, kind, columns):
    image = b64(tiles["tile1.png"])
    full = outputs(server.score(score_body([image])))
    response = server.score(score_body([image], params={"embedding": kind}))
    part = outputs(response)
    assert response.headers["x-virchow-embedding"] == kind
    assert part.shape == (1, 160)
    assert np.abs(part - full[:, columns]).max() <= TOLERANCE


def test_patch_tokens_needs_server_default(server, tiles):
    response = server.score(score_body([b64(tiles["tile0.png"])], params={"embedding": "patch_tokens"}))
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_params"


def test_index_labels_in_row_errors(server, tiles):
    body = score_body([b64(tiles["tile0.png"]), "not base64 !!"])
    body["input_data"]["index"] = ["a", "b"]
    response = server.score(body)
    assert response.status_code == 400
    payload = response.json()
    assert payload["row"] == 1
    assert payload["index"] == "b"
    assert [entry["row"] for entry in payload["errors"]] == [1]


def test_liveness_and_info(server):
    assert server.client.get("/health").json() == {"status": "ok"}
    info = server.client.get("/").json()
    assert info["model"] == "virchow-test"
    assert info["ready"] is True
    assert info["embedding_shape"] == [320]
    assert info["weights_random"] is True


def test_openapi_describes_score(server):
    schema = server.client.get("/openapi.json").json()
    request_body = schema["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert request_body == {"$ref": "#/components/schemas/ScoreRequest"}
    assert "input_data" in schema["components"]["schemas"]["ScoreRequest"]["properties"]
    assert "InputData" in schema["components"]["schemas"]
    assert server.client.get("/docs").status_code == 200


def test_request_id_is_echoed(server, tiles):
    response = server.score(score_body([b64(tiles["tile0.png"])]), headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = server.client.get("/health").headers["x-request-id"]
    assert len(generated) == 32


def test_metrics_after_requests(server, tiles, image_host):
    server.score(score_body([b64(tiles["tile0.png"])]))
    server.score(score_body([image_host.url("/tiles/tile0.png")]))
    server.client.post("/score", content=b"{")
    text = server.client.get("/metrics").text
    assert 'virchow_serve_requests_total{method="POST",route="/score",status="200"}' in text
    assert 'virchow_serve_requests_total{method="POST",route="/score",status="400"}' in text
    assert "virchow_serve_request_duration_seconds_bucket" in text
    assert "virchow_serve_batch_size_images_count" in text
    assert "virchow_serve_queue_depth_images" in text
    assert 'virchow_serve_images_fetched_total{outcome="ok"}' in text
    assert "virchow_serve_ready 1.0" in text
