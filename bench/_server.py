"""The scripted model server in its own process, for the benchmarks."""

from ralph.testing.processes import model_server_process, server_stats

__all__ = ["model_server_process", "server_stats"]
