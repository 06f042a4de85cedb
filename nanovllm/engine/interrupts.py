"""Keep Ctrl-C (SIGINT) from landing in the middle of a step.

A step launches work that must complete on every rank: with tensor parallelism rank 0 and the workers
run the same sequence of collectives, and a KeyboardInterrupt raised between two of them on rank 0
would leave a worker inside one that rank 0 never joins (the next call then pairs mismatched
collectives and the engine is dead). `deferred_interrupts()` holds SIGINT for the length of a step and
raises the KeyboardInterrupt when the step's bookkeeping is consistent again. Only the main thread
receives signals in Python; elsewhere it does nothing.
"""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Run the block with SIGINT held back; a SIGINT that arrived meanwhile is delivered after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN or SIG_DFL: nothing of Python's to run mid-step anyway
        yield
        return
    received: list[tuple] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        previous(*received[0])  # the default handler raises KeyboardInterrupt
