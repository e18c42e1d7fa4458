"""Live, read-only views of the names in a registry (a leaf of ``lit_ptq.quant``).

``METHODS``, ``PLACEMENTS`` and ``SOFTMAX_QUANTIZERS`` are such views: they list what is
registered when they are read, so an observer or a family registered outside the package
appears in them, and there is no second list to keep in step with the registry.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Callable, overload

__all__ = ["NameView"]


class NameView(Sequence[str]):
    """The names ``names()`` returns, read each time the view is used.

    Args:
        names: returns the current names, in order.
        description: what the names are, for ``repr``.
    """

    def __init__(self, names: Callable[[], Sequence[str]], description: str) -> None:
        self._names, self._description = names, description

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...

    def __getitem__(self, index):
        return tuple(self._names())[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._names()))

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return f"<{self._description}: {', '.join(self)}>"
