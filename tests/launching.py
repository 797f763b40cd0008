"""Subprocess launches for the tests. A launch that runs past its limit is killed with its whole
process group (the deepspeed launcher's ranks included, so none lingers on ports, /dev/shm or the CPU),
and the test fails with the tail of what it printed rather than a bare TimeoutExpired."""
import os
import signal
import subprocess

import pytest

TAIL = 6000


def run(cmd, *, timeout: float, env=None, cwd=None) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past its {timeout} s limit and was killed; it printed:\n"
                    f"{stdout[-TAIL:]}\n{stderr[-TAIL:]}", pytrace=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
