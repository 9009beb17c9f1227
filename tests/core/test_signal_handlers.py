"""The run's SIGINT/SIGTERM handlers and its second-Ctrl-C wakeup fd are put back on every path.

In-process runs (a notebook, the pytest fixtures) run many trainers in one interpreter: a handler
or wakeup fd left behind by one run would break the next (a closed fd handed back to
``signal.set_wakeup_fd`` fails with EBADF, or with "must be in non-blocking mode" once the
number is reused).
"""

from __future__ import annotations

import signal

from kktrain import hookimpl


class FailsAtTrainStart:
    name = "fails-at-train-start"

    @hookimpl
    def on_train_start(self, trainer):
        raise RuntimeError("a plugin's set-up failed")


def _wakeup_fd() -> int:
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    return fd


def test_a_plugin_failing_at_train_start_leaves_no_handler_or_wakeup_fd_behind(kktrain_run):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    fd = _wakeup_fd()
    out = kktrain_run(plugins=[FailsAtTrainStart()], steps=2, raise_errors=False)
    assert out.error is not None and "set-up failed" in str(out.error)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert _wakeup_fd() == fd
    for _ in range(3):  # later runs in the same process install and undo cleanly
        kktrain_run(steps=2).assert_success()
    assert _wakeup_fd() == fd


def test_a_stale_previous_wakeup_fd_is_not_handed_back(kktrain_run):
    """The fd a run found (another owner's, closed during the run) is not restored at its end."""
    import socket

    a, b = socket.socketpair()
    b.setblocking(False)
    before = signal.set_wakeup_fd(b.fileno())
    try:
        class ClosesTheOldFd:
            name = "closes-the-old-fd"

            @hookimpl
            def on_train_start(self, trainer):
                b.close()  # its owner goes away while the run holds the wakeup fd

        kktrain_run(plugins=[ClosesTheOldFd()], steps=2).assert_success()
        assert _wakeup_fd() == -1
        kktrain_run(steps=2).assert_success()
    finally:
        signal.set_wakeup_fd(before)
        a.close()
