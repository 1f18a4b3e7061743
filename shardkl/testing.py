"""Test utilities: count the ``torch.distributed`` collectives a piece of code issues.

:func:`count_collectives` patches ``torch.distributed`` for the whole process while it is active (as
``torch.testing`` keeps PyTorch's own test helpers apart from the library), so it belongs in tests and benchmarks,
not in training code. shardkl's tests and ``python -m shardkl.bench`` use it to show one collective per forward
and none per backward.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import Tensor

_COUNTED = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_reduce",
    "reduce_scatter_tensor",
    "broadcast",
    "all_to_all_single",
    "reduce",
    "gather",
    "scatter",
    "barrier",
)


@dataclass
class CollectiveCounter:
    """Counts calls of ``torch.distributed`` collectives and the bytes each rank sends through them."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def reset(self) -> None:
        self.calls.clear()
        self.bytes_sent = 0


def _tensor_bytes(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> int:
    tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, Tensor)]
    if not tensors:
        return 0
    # the input is the last positional tensor for gathers (output first), the first otherwise
    t = tensors[-1] if name.startswith("all_gather") else tensors[0]
    return t.numel() * t.element_size()


@contextmanager
def count_collectives() -> Iterator[CollectiveCounter]:
    """Context manager that counts ``torch.distributed`` collectives issued inside it (this process only).

    Example:
        >>> with count_collectives() as c:
        ...     shardkl.exact_kl(p, q, group=g)
        >>> c.total, c.bytes_sent
    """
    counter = CollectiveCounter()
    originals: dict[str, Any] = {}
    depth = threading.local()

    def wrap(name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            # one user-level call counts once, even where torch implements it through another collective
            outer = getattr(depth, "value", 0) == 0
            if outer:
                counter.calls[name] = counter.calls.get(name, 0) + 1
                counter.bytes_sent += _tensor_bytes(args, kwargs, name)
            depth.value = getattr(depth, "value", 0) + 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth.value -= 1

        return counted

    for name in _COUNTED:
        fn = getattr(dist, name, None)
        if fn is not None:
            originals[name] = fn
            setattr(dist, name, wrap(name, fn))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


__all__ = ["CollectiveCounter", "count_collectives"]

