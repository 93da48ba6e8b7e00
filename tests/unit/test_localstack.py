"""Port choice for the local S3 server (no server started here)."""

from __future__ import annotations

import pytest

from services import localstack


def test_weed_ports_avoid_each_others_grpc_port(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sequence a random picker could hand out: 37083's gRPC port (47083) is the S3 port, 21000's gRPC port is
    # 31000, and 31000 itself comes later - each collision made `weed mini` refuse to start.
    offered = iter([37083, 21000, 31000, 47083, 22000, 23000, 24000])
    monkeypatch.setattr(localstack, "free_port", lambda **_: next(offered))
    ports = localstack.weed_ports(47083)
    assert ports == {"master": 21000, "volume": 22000, "filer": 23000, "admin": 24000}
    everything = [47083, *ports.values()]
    derived = {p + 10000 for p in everything}
    assert len(set(everything)) == len(everything) and not derived & set(everything)


def test_weed_ports_gives_up_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localstack, "free_port", lambda **_: 37083)  # always the S3 port's gRPC twin
    with pytest.raises(RuntimeError, match="no free port pair"):
        localstack.weed_ports(47083, names=("master",))
