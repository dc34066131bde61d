"""A bounded shutdown, shared by the normalizer (stream.agents) and the worker (stream.worker).

Told to stop, a service finishes its batch, commits and leaves its consumer group. Against
brokers that stopped answering (frozen, partitioned away), committing and leaving the group
block inside librdkafka for minutes or for good. So once the stop signal comes, a deadline
runs: ``SHUTDOWN_S`` later a process still running exits with ``EXIT_SHUTDOWN_TIMEOUT``, as
after a crash. What it had not committed is read again after the restart; the stores and the
offsets are made for that (writes are write-then-rename, offsets are committed only after the
work they cover is durable, so an exit mid-commit leaves the batch done but uncommitted, never
committed but undone).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# Seconds from the stop signal to the end of the process, whatever the brokers do meanwhile
# (under the 10 s `docker stop` waits before SIGKILL).
SHUTDOWN_S = 9.0
EXIT_SHUTDOWN_TIMEOUT = 70  # the exit status when SHUTDOWN_S ran out (EX_SOFTWARE)


def start_deadline(service: str, seconds: float = SHUTDOWN_S) -> threading.Timer:
    """End this process ``seconds`` from now with ``EXIT_SHUTDOWN_TIMEOUT``, unless the
    returned timer is cancelled first. ``service`` names the process in the log line."""

    def expire() -> None:
        log.error("the %s did not stop within %g s of the signal (brokers unreachable?): exiting; "
                  "what was not committed is read again after the restart", service, seconds)
        logging.shutdown()
        os._exit(EXIT_SHUTDOWN_TIMEOUT)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


def on_signal_delivery(signals: set[int], callback: Callable[[int], None]) -> Callable[[], None]:
    """Call ``callback(signum)`` from a thread of its own as soon as one of ``signals`` is
    delivered; returns a function that undoes this. Main thread only; the signals need Python
    handlers (``signal.signal``), which are what write to the wakeup fd used here.

    Python runs signal handlers in the main thread only, between two bytecodes: while that
    thread waits in librdkafka (a synchronous commit against a frozen broker never returns),
    a deadline started by the handler would never start. The interpreter's C-level handler
    writes the signal number to ``signal.set_wakeup_fd`` at once, whichever thread it
    interrupts, and the thread waiting on that pipe needs only the GIL, which librdkafka's
    blocking calls release. Replaces any wakeup fd set before (asyncio's loops set one: not
    for processes whose signals asyncio handles)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # set_wakeup_fd requires it: a signal must never block
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        try:
            while data := os.read(read_fd, 64):  # b"" once undone: the write end is closed
                for signum in data:
                    if signum in signals:
                        callback(signum)
        finally:
            os.close(read_fd)

    threading.Thread(target=watch, name="signal-watch", daemon=True).start()

    def undo() -> None:
        signal.set_wakeup_fd(previous)
        os.close(write_fd)

    return undo
