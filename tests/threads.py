"""One torch intra-op thread for the span of a test or fixture, restored afterwards.

On a CPU shared with other jobs torch's default threads spin against each other (measured: a test file took
5 min instead of 30 s, and the many small decode ops of a search ran 10-25× slower with two threads). It also
pins float32 reduction order where a result is compared with one computed in a one-thread actor.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
