"""``python -m upstream_guard``: the ``upstream-guard`` command."""

from ._cli import console

console()
