"""The status page server: page, JSON with its query, 404 and a clean 500."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Mapping

import pytest

from swarmtune.protocols.web import StatusServer


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def test_serves_the_page_and_the_json_with_its_query() -> None:
    asked: list[dict] = []

    def data(query: Mapping[str, str]) -> dict:
        asked.append(dict(query))
        return {"peers": [1, 2], "value": 0.5}

    server = StatusServer("127.0.0.1", 0, b"<html>page</html>", data)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        code, kind, body = _get(server.url)
        assert (code, body) == (200, b"<html>page</html>") and kind.startswith("text/html")
        code, kind, body = _get(server.url + "api/status?since=12.5")
        assert code == 200 and kind == "application/json"
        assert json.loads(body) == {"peers": [1, 2], "value": 0.5}
        assert asked == [{"since": "12.5"}]
        assert _get(server.url + "nothing")[0] == 404
    finally:
        server.close()


def test_a_non_finite_value_is_a_500_not_invalid_json() -> None:
    server = StatusServer("127.0.0.1", 0, b"", lambda query: {"loss": math.nan})
    try:
        code, _, body = _get(server.url + "api/status")
        assert code == 500 and b"JSON" in body
    finally:
        server.close()


def test_a_taken_port_is_one_clear_error() -> None:
    server = StatusServer("127.0.0.1", 0, b"", lambda query: {})
    try:
        port = int(server.url.rsplit(":", 1)[1].strip("/"))
        with pytest.raises(OSError, match=f"cannot serve the status page on 127.0.0.1:{port}"):
            StatusServer("127.0.0.1", port, b"", lambda query: {})
    finally:
        server.close()
