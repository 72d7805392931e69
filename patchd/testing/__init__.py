"""Test doubles shipped with patchd, for its own tests and for third-party backends.

- `patchd.testing.fake`: FakeBackend, an in-memory backend with no I/O. It is also
  registered as the backend type `fake` (`type = "fake"` in a config), a testing aid.
- `patchd.testing.contract`: the backend contract as a pytest suite that any backend runs
  (it imports pytest, so it is not imported here).
"""

from patchd.testing.fake import FakeBackend, FakeConfig, FakeSelect, FakeTarget

__all__ = ["FakeBackend", "FakeConfig", "FakeSelect", "FakeTarget"]
