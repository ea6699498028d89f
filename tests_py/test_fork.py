"""A process forked after socketcomm ran (multiprocessing's "fork" start method) gets a clear
error instead of a client that hangs, and the parent's connections are not disturbed."""

from __future__ import annotations

import multiprocessing
import warnings
from multiprocessing.connection import Connection

import socketcomm


def child(address: tuple[str, int], report: Connection) -> None:
    try:
        socketcomm.Client(*address, timeout=3)
    except RuntimeError as e:
        report.send(("refused", str(e)))
    except BaseException as e:  # the test reports whatever else happened
        report.send(("other", repr(e)))
    else:
        report.send(("connected", ""))
    try:
        socketcomm.Server("127.0.0.1", 0)
    except RuntimeError as e:
        report.send(("refused", str(e)))
    else:
        report.send(("served", ""))


def test_a_forked_child_is_refused_and_the_parent_keeps_working() -> None:
    with socketcomm.Server(mode="echo") as server, socketcomm.Client(*server.address) as client:
        assert client.request("before", timeout=3) == b"before"
        context = multiprocessing.get_context("fork")
        ours, theirs = context.Pipe()
        with warnings.catch_warnings():
            # Python 3.12+ warns that forking a multi-threaded process may deadlock the
            # child: that is the case this test makes.
            warnings.simplefilter("ignore", DeprecationWarning)
            process = context.Process(target=child, args=(server.address, theirs))
            process.start()
        assert ours.poll(15), "the child reported nothing"
        outcomes = [ours.recv(), ours.recv()]
        process.join(15)
        assert process.exitcode == 0
        for outcome, text in outcomes:
            assert outcome == "refused", (outcome, text)
            assert "forked after it ran" in text and "spawn" in text
        # The parent's connection is served as before, the child gone.
        for n in range(20):
            assert client.request(f"after {n}", timeout=3) == f"after {n}".encode()
