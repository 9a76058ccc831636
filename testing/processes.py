"""Child processes of the tests: each in a process group of its own, torn down whatever
happens, a time limit that fails with a clear message, and its output shown on failure.

A launcher (accelerate, torchrun, mp.spawn) starts workers of its own. Killed on a time-out,
``subprocess.run`` would end the launcher and leave its workers running, holding a port and
both cores for the rest of the suite; here the whole group goes.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess


class ChildFailed(AssertionError):
    """A child process that timed out or exited non-zero: the message carries its output."""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    """A port no one listens on now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(text: str | None, chars: int) -> str:
    return (text or "")[-chars:]


def run_child(argv, *, timeout: float, what: str, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """Run ``argv`` (text output captured) in a new process group; whatever is left of the group
    afterwards is killed. ``check``: a non-zero exit raises ChildFailed with the output tails."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate()
        raise ChildFailed(f"{what} did not finish within {timeout:g} s; its process group was killed.\n"
                          f"--- stdout (end)\n{tail(stdout, 3000)}\n--- stderr (end)\n{tail(stderr, 6000)}") from None
    finally:
        _kill_group(proc.pid)  # the workers of a launcher that exited early
    result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise ChildFailed(f"{what} exited {proc.returncode}.\n--- stdout (end)\n{tail(stdout, 3000)}\n"
                          f"--- stderr (end)\n{tail(stderr, 6000)}")
    return result
