"""`pact sql` can be stopped: Ctrl-C (SIGINT) ends any query with `aborted`, exit code 130;
`--timeout SECONDS` ends it with one `error:` line, exit code 2 (issue 15, failure 1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from hostile.harness import ROOT, assert_one_error_line, call_pact

from pact.store.sql import QueryTimeout, connect_readonly, run_interruptible

ENDLESS = "SELECT count(*) FROM range(1000000000000) t(x) WHERE x % 7 = 3"


def test_sigint_stops_a_long_query_with_one_line(store):
    """The attack: Ctrl-C was ignored while DuckDB ran. The child gets 3 s to start the
    query; the test ends (killing the child) even when SIGINT is ignored."""
    child = subprocess.Popen(
        [sys.executable, "-m", "pact", "sql", str(store.root), ENDLESS],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(3)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert (child.returncode, out, err) == (130, "", "aborted\n")


def test_timeout_stops_a_long_query_with_one_line(store):
    result = call_pact("sql", store.root, ENDLESS, "--timeout", "0.5")
    assert_one_error_line(result, r"^error: the query ran past --timeout 0\.5 s and was stopped$")


def test_a_query_within_its_timeout_answers(store):
    result = call_pact("sql", store.root, "SELECT count(*) AS n FROM targets", "--format", "csv", "--timeout", "60")
    assert (result.returncode, result.stdout) == (0, "n\n20\n")


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_bad_timeouts_are_one_line(store, value):
    assert_one_error_line(call_pact("sql", store.root, "SELECT 1", "--timeout", value), r"--timeout")


def test_keyboard_interrupt_stops_the_worker_and_frees_the_connection(store):
    """In-process: SIGINT while the main thread waits interrupts DuckDB; the connection is
    idle again (closing it works). Bounded by a 60 s timeout if the interrupt were lost."""
    con = connect_readonly(store)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_interruptible(con, lambda: con.execute(ENDLESS).fetchall(), timeout=60)
    except QueryTimeout:
        pytest.fail("SIGINT did not stop the query")
    finally:
        timer.cancel()
    con.close()


def test_a_query_that_starts_after_the_stop_is_still_stopped(store):
    """Attack rerun I15-F1a (a loaded machine): Ctrl-C landed before DuckDB had started the
    query, the one interrupt was lost, and `pact sql` ran on. Now the stop interrupts again
    every 0.1 s while the query's thread runs."""
    import time

    con = connect_readonly(store)

    def late_query() -> list:
        time.sleep(0.3)  # the stop (timeout 0.05 s) comes before the query starts
        return con.execute(ENDLESS).fetchall()

    with pytest.raises(QueryTimeout):
        run_interruptible(con, late_query, timeout=0.05)
    workers = [t for t in threading.enumerate() if t.name == "pact-sql"]
    for worker in workers:
        worker.join(1.0)  # it has set its done event; let it return
    still_running = [t for t in workers if t.is_alive()]
    if still_running:
        con.interrupt()  # do not leave it spinning in the test process
    assert not still_running
    con.close()
