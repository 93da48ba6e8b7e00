"""API keys: list, revoke exactly one, expiry, throttled last_used_at, and the cache's revocation delay."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from services.api.deps import forget_keys
from services.errors import Invalid
from services.projects.service import create_key, find_key
from shared.config import get_settings
from shared.db import session_scope
from shared.models import ApiKey, utcnow

pytestmark = pytest.mark.integration


def _key(project: str, **kw):
    with session_scope() as s:
        key, token = create_key(session=s, project_name=project, **kw)
        return key.id, token


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_list_shows_the_projects_keys_and_no_secrets(client):
    project = f"keys-{uuid.uuid4().hex[:8]}"
    a, token_a = _key(project, name="ci")
    b, _ = _key(project, name="laptop", expires_in=timedelta(days=1))
    _key(f"other-{uuid.uuid4().hex[:8]}")
    r = client.get("/v1/keys", headers=_h(token_a))
    assert r.status_code == 200, r.json()
    rows = r.json()
    assert {row["id"] for row in rows} == {str(a), str(b)}
    assert all("key_hash" not in row and len(row["prefix"]) == 12 for row in rows)
    assert next(row for row in rows if row["id"] == str(b))["expires_at"] is not None


def test_revoking_one_key_leaves_keys_sharing_its_prefix_alone(client):
    a, token_a = _key(f"rev-{uuid.uuid4().hex[:8]}")
    b, token_b = _key(f"rev-{uuid.uuid4().hex[:8]}")  # another project ...
    with session_scope() as s:  # ... whose key happens to share the 12-character prefix
        prefix = s.get(ApiKey, a).prefix
        s.execute(update(ApiKey).where(ApiKey.id == b).values(prefix=prefix))
    assert client.get("/v1/projects/current", headers=_h(token_b)).status_code == 200
    r = client.delete(f"/v1/keys/{a}", headers=_h(token_a))
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert client.get("/v1/projects/current", headers=_h(token_a)).status_code == 401  # at once, same process
    assert client.get("/v1/projects/current", headers=_h(token_b)).status_code == 200
    assert client.delete(f"/v1/keys/{b}", headers=_h(token_a)).status_code == 401
    with session_scope() as s:
        with pytest.raises(Invalid, match="matches 2 keys"):  # a shared prefix never revokes several keys
            find_key(session=s, ref=prefix)
    # b's own project cannot see a's key either
    assert client.delete(f"/v1/keys/{a}", headers=_h(token_b)).status_code == 404


def test_a_key_revoked_elsewhere_stops_within_the_cache_window(client, monkeypatch):
    monkeypatch.setattr(get_settings(), "API_KEY_CACHE_SECONDS", 0.5)
    key_id, token = _key(f"cache-{uuid.uuid4().hex[:8]}")
    assert client.get("/v1/projects/current", headers=_h(token)).status_code == 200
    with session_scope() as s:  # another replica (or the CLI) revokes it
        s.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))
    time.sleep(0.6)
    assert client.get("/v1/projects/current", headers=_h(token)).status_code == 401


def test_expired_keys_are_refused_and_use_is_recorded_throttled(client):
    forget_keys()
    key_id, token = _key(f"exp-{uuid.uuid4().hex[:8]}", expires_in=timedelta(seconds=1.5))
    assert client.get("/v1/projects/current", headers=_h(token)).status_code == 200
    with session_scope() as s:
        first = s.get(ApiKey, key_id).last_used_at
    assert first is not None
    forget_keys()  # force a second lookup: within a minute it does not write again
    assert client.get("/v1/projects/current", headers=_h(token)).status_code == 200
    with session_scope() as s:
        assert s.get(ApiKey, key_id).last_used_at == first
    time.sleep(1.6)
    r = client.get("/v1/projects/current", headers=_h(token))  # still cached, but past its expiry
    assert r.status_code == 401 and "expired" in r.json()["detail"][0]["msg"]


def test_cli_lists_and_revokes_exactly_one_key(stack):
    from services.cli.main import app

    project = f"cli-{uuid.uuid4().hex[:8]}"
    a, _ = _key(project, name="one")
    b, _ = _key(project, name="two")
    runner = CliRunner()
    out = runner.invoke(app, ["keys", "list", "--project", project])
    assert out.exit_code == 0 and str(a) in out.output and str(b) in out.output
    out = runner.invoke(app, ["keys", "revoke", str(a), "--project", project])
    assert out.exit_code == 0, out.output
    with session_scope() as s:
        states = dict(s.execute(select(ApiKey.id, ApiKey.revoked_at).where(ApiKey.id.in_([a, b]))).all())
    assert states[a] is not None and states[b] is None
    out = runner.invoke(app, ["keys", "revoke", "crk_nosuchkey"])
    assert out.exit_code == 1 and "no API key" in out.output
