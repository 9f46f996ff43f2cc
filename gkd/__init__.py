"""The ``gkd`` command line and the one-command pipeline (the only place that uses kd, export and bench together)."""

__all__: list[str] = []
