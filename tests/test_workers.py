"""A DataLoader worker dies with its process (pipeline/data/workers.py). torch's own watchdog ends a worker's loop
when its parent vanishes, but the worker can then wait forever at exit, flushing batches into a pipe nobody reads
(found as orphans of the kill tests; tests/faults/test_stage_kill.py checks that a killed stage leaves none).
Here the mechanism: a process that calls ``exit_with_parent`` and then hangs still ends once its parent is killed."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PARENT = textwrap.dedent("""
    import os, sys, time
    from pipeline.data.workers import dies_with_this_process

    init = dies_with_this_process()  # made in the parent, as a DataLoader's worker_init_fn is
    pid = os.fork()
    if pid == 0:  # the worker: hangs (as in a join that never returns) unless exit_with_parent ends it
        if sys.argv[1] == "watched":
            init(0)
        time.sleep(600)
        os._exit(3)
    print(pid, flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("mode", ["watched", "plain"])
def test_a_worker_ends_when_its_process_is_killed(tmp_path, mode):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    p = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(p.stdout.readline())
        assert _alive(worker)
        p.send_signal(signal.SIGKILL)  # at once: before the worker may have run init (then it ends there)
        p.wait()
        deadline = time.time() + 5
        while time.time() < deadline and _alive(worker):
            time.sleep(0.1)
        # watched: gone within a few polls; plain: the hung worker outlives its parent (what the watch is for)
        assert _alive(worker) == (mode == "plain")
    finally:
        p.kill()
        if worker is not None:
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass
