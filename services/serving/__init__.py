"""Serving: ``POST /v1/route`` and ``POST /v1/generate`` answered by router replicas over the broker (MoIN §5;
shared/serving.py has the wire and the placement design, workers/router/ the replicas)."""
