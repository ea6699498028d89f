"""Helper processes that stop when they are told to and when their parent is gone.

A process started by another one (a ``--workers`` server, a benchmark's peer) must not outlive
it: nobody would stop it, and it would keep its port. Two things used to let it: a signal mask
inherited from a parent that blocks SIGTERM (to ``sigwait`` for it) is kept across ``exec``, so
a handler installed for SIGTERM never ran; and a parent killed with SIGKILL sends nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

# From <linux/prctl.h>: deliver a signal to this process when its parent thread ends.
_PR_SET_PDEATHSIG = 1
# How often the portable fallback looks at the parent's pid.
_PARENT_POLL_SECONDS = 0.5


def accept_stop_signals() -> None:
    """Unblocks SIGINT and SIGTERM in this thread, whatever mask the parent passed on."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def stop_with_parent(parent: int) -> None:
    """Sends this process SIGTERM once ``parent`` (the pid that started it) is gone.

    On Linux the kernel does it (``PR_SET_PDEATHSIG``), at once; elsewhere a daemon thread
    notices within half a second. A parent already gone when this is called counts too.
    """
    if sys.platform == "linux" and _set_parent_death_signal(signal.SIGTERM):
        # The parent may have died before the request was made: then nothing will fire.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
        return
    threading.Thread(
        target=_watch_parent, args=(parent,), name="socketcomm-parent-watch", daemon=True
    ).start()


def python_command(code: str, *args: str) -> list[str]:
    """The command that runs ``code`` (``python -c``) in a process that stops with this one."""
    guard = "import os, socketcomm._lifetime as l; l.stop_with_parent(os.getppid())\n"
    return [sys.executable, "-c", guard + code, *args]


def _set_parent_death_signal(signum: int) -> bool:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    return bool(libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
