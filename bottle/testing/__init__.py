"""Test helpers shipped for bottle's own tests and for plugin authors."""

from bottle.testing.fake_docker import FakeDocker, FakeEngine

__all__ = ["FakeDocker", "FakeEngine"]
