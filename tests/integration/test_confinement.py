"""The confinement suite (bottle.testing.confinement) against real bottles on the real Docker Engine."""

import pytest

from bottle.backends.docker import DockerBackend
from bottle.testing.confinement import ConfinementSuite


class TestDockerConfinement(ConfinementSuite):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls):
        return DockerBackend()

    @pytest.fixture(scope="class")
    @classmethod
    def agent_image(cls, python_base):
        return python_base
