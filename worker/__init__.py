"""The reference worker fleet: a Celery app configured from the environment."""
