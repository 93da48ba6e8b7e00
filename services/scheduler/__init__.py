"""The scheduler process (``crucible scheduler``): dispatcher + reconciler in one loop.

* ``dispatcher.py`` publishes outbox rows to the worker kinds' Celery queues, highest priority first, keeping
  only a small window of messages in each queue so that priority decides, not broker order.
* ``reconciler.py`` re-queues jobs whose lease expired (attempt + 1), re-publishes dispatched jobs nobody
  claimed, starts jobs whose dependencies succeeded and fails those whose dependencies did not.
"""
