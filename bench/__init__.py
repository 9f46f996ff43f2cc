"""gkd benchmarks: latency and accuracy harnesses and reports. May import ``export`` and ``kd``."""

__all__: list[str] = []
