"""A small typed HTTP client for the REST API (used by the CLI, the demo and the benchmarks)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx

from shared.config import default_home

CLIENT_FILE = "client.json"


class ApiError(Exception):
    """An HTTP error from the API, rendered as 'field: reason' lines."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status, self.detail = status, detail
        super().__init__(self.render())

    def render(self) -> str:
        if isinstance(self.detail, list):
            lines = []
            for d in self.detail:
                loc = ".".join(str(p) for p in d.get("loc", []) if p not in ("body",))
                lines.append(f"{loc}: {d.get('msg')}" if loc else str(d.get("msg")))
            return f"HTTP {self.status}: " + "; ".join(lines)
        return f"HTTP {self.status}: {self.detail}"


def load_client_config(home: Path | None = None) -> tuple[str, str | None]:
    """API URL and key: CRUCIBLE_API_URL / CRUCIBLE_API_KEY, else what `crucible up` saved in CRUCIBLE_HOME."""
    url, key = os.environ.get("CRUCIBLE_API_URL"), os.environ.get("CRUCIBLE_API_KEY")
    path = (home or default_home()) / CLIENT_FILE
    if (url is None or key is None) and path.exists():
        saved = json.loads(path.read_text())
        url, key = url or saved.get("api_url"), key or saved.get("api_key")
    return url or "http://127.0.0.1:8000", key


class Client:
    def __init__(self, url: str | None = None, key: str | None = None, *, timeout: float = 60.0) -> None:
        if url is None or key is None:
            cfg_url, cfg_key = load_client_config()
            url, key = url or cfg_url, key or cfg_key
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)
        return r.json() if r.content else None

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            return self._check(self.http.request(method, path, **kw))
        except httpx.ConnectError as e:
            raise ConnectionError(f"cannot reach the Crucible API at {self.url} ({e}); start it with `crucible up` "
                                  "or set CRUCIBLE_API_URL") from None

    def _object(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        return cast(dict[str, Any], self.request(method, path, **kw))  # the endpoint's response model is an object

    def _list(self, method: str, path: str, **kw: Any) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.request(method, path, **kw))  # (a list of objects)

    # --- jobs ---
    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._object("POST", "/v1/jobs", json=spec, headers=headers)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._object("GET", f"/v1/jobs/{job_id}")

    def jobs(self, **params: Any) -> dict[str, Any]:
        return self._object("GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None})

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._object("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, *, after: int = 0) -> list[dict[str, Any]]:
        return self._list("GET", f"/v1/jobs/{job_id}/events", params={"after": after})

    def follow(self, job_id: str, *, after: int = 0) -> Iterator[dict[str, Any]]:
        """Server-Sent Events until the job ends (reconnects with Last-Event-ID if the stream drops)."""
        last = after
        while True:
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events",
                                      params={"follow": "true", "after": last}, timeout=None) as r:
                    if r.status_code >= 400:
                        r.read()
                        self._check(r)
                    event_type, data = None, None
                    for line in r.iter_lines():
                        if line.startswith("event: "):
                            event_type = line[7:]
                        elif line.startswith("data: "):
                            data = line[6:]
                        elif line == "" and event_type:
                            if event_type == "end":
                                return
                            ev = json.loads(data or "{}")
                            last = ev.get("id", last)
                            yield ev
                            event_type, data = None, None
            except (httpx.RemoteProtocolError, httpx.ReadError):
                continue

    # --- datasets / artifacts ---
    def upload_dataset(self, path: Path, *, name: str, format: str = "images") -> dict[str, Any]:  # noqa: A002
        with open(path, "rb") as f:
            return self._object("POST", "/v1/datasets", data={"name": name, "format": format},
                                files={"file": (path.name, f)}, timeout=None)

    def register_dataset(self, uri: str, *, name: str) -> dict[str, Any]:
        return self._object("POST", "/v1/datasets", json={"name": name, "uri": uri})

    def datasets(self) -> list[dict[str, Any]]:
        return self._list("GET", "/v1/datasets")

    def artifact(self, artifact_id: str) -> dict[str, Any]:
        return self._object("GET", f"/v1/artifacts/{artifact_id}")

    def artifacts(self, **params: Any) -> list[dict[str, Any]]:
        return self._list("GET", "/v1/artifacts", params={k: v for k, v in params.items() if v is not None})
