"""The router worker kind: a long-running replica that serves an expert set (MoIN §5), started as a ``router``
service job. ``replica.run`` is the entry point; ``engine`` holds the base and the adapters, ``adapters`` the LRU
cache policy, ``batcher`` groups requests per expert, ``metrics`` the replica's Prometheus metrics."""
