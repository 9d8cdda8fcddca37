"""The fault harness itself: a kill that lands before the child opened its logs."""

from __future__ import annotations

from fault_harness import ForkServer


def test_child_killed_at_once_still_reports_a_result(tmp_path):
    """CI regression: SIGKILL before the child opened its log files made `run` raise
    FileNotFoundError instead of returning a killed result."""
    with ForkServer(tmp_path / "logs", preload=()) as server:
        results = [server.run(["--help"], kill_after=0.0) for _ in range(5)]
    for result in results:
        assert result.killed
        assert result.stdout == "" and result.stderr == ""
