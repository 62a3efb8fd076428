"""`swarm` children of a local swarm are forked from a process that has imported the heavy libraries once;
they must behave as fresh interpreters would: their own directory, environment, exit code and log."""

import os

from swarm.local.forkserver import ForkedProcess, fork_server_for
from swarm.local.processes import CLI_PREFIX, ManagedProcess


def test_a_cli_child_is_forked_and_runs_like_a_fresh_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    writes_key = ManagedProcess(
        "keys", [*CLI_PREFIX, "keys", "init", "--out", "swarm.key"], tmp_path / "k.log"
    )
    bad_flag = ManagedProcess("bad", [*CLI_PREFIX, "node", "--no-such-flag"], tmp_path / "bad.log")
    try:
        assert isinstance(writes_key.popen, ForkedProcess) and isinstance(bad_flag.popen, ForkedProcess)
        assert writes_key.popen.wait(60) == 0, writes_key.log()
        assert (tmp_path / "swarm.key").exists()  # it ran in our working directory
        assert bad_flag.popen.wait(60) == 2  # argparse's usage error, as from a fresh `swarm`
        assert "unrecognized arguments: --no-such-flag" in bad_flag.log()
    finally:
        writes_key.kill()
        bad_flag.kill()


def test_a_setting_read_at_import_time_gets_its_own_fork_server():
    base = dict(os.environ)
    server = fork_server_for(base)
    assert server is not None and server.serves(base)
    assert fork_server_for({**base, "SWARM_ANYTHING": "1"}) is server
    other = {**base, "OMP_NUM_THREADS": "1" if base.get("OMP_NUM_THREADS") != "1" else "2"}
    assert not server.serves(other)


def test_a_forked_child_gets_its_own_hivemind_locks():
    """Inherited from the server, hivemind's cross-process locks would be one for all children: a peer killed
    while it held MPFuture's update lock blocked every peer started after it (the suite hung that way)."""
    from hivemind.utils.asyncio import _AsyncContextWrapper
    from hivemind.utils.mpfuture import MPFuture, SharedBytes

    from swarm.local.forkserver import _own_process_locks

    # this process's MPFuture backend goes on serving the rest of the suite: put it all back afterwards
    saved = (MPFuture._active_pid, MPFuture._update_lock, MPFuture._initialization_lock, SharedBytes._lock)
    saved_executor_lock = _AsyncContextWrapper.EXECUTOR_LOCK
    inherited = [MPFuture._update_lock, MPFuture._initialization_lock, _AsyncContextWrapper.EXECUTOR_LOCK]
    for lock in inherited:
        assert lock.acquire(timeout=5)  # held, as by a peer that died holding it
    try:
        _own_process_locks()
        fresh = [MPFuture._update_lock, MPFuture._initialization_lock, _AsyncContextWrapper.EXECUTOR_LOCK]
        for lock in fresh:
            assert lock.acquire(timeout=5)
            lock.release()
    finally:
        for lock in inherited:
            lock.release()
        MPFuture._active_pid, MPFuture._update_lock, MPFuture._initialization_lock, SharedBytes._lock = saved
        _AsyncContextWrapper.EXECUTOR_LOCK = saved_executor_lock
