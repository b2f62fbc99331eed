"""Kept for imports in tests: the helpers live in upstream_guard.testing."""

from upstream_guard.testing import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]
