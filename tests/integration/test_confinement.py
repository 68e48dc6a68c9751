"""The confinement suite (bottle.testing.confinement) against real bottles on the real Docker Engine.

The docker backend runs for real. The smolmachines backend runs with the fake VM (the real smolvm for
every call but the boot; the boot is a stand-in container confined by iptables to what smolvm recorded),
or, with BOTTLE_TEST_KVM=1 on a machine with hardware KVM, with the real smolvm booting a real VM.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from bottle.backends.docker import DockerBackend
from bottle.backends.smolmachines import SmolmachinesBackend
from bottle.backends.smolmachines.smolvm import Smolvm
from bottle.testing import fake_smolvm
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


class TestSmolmachinesConfinement(ConfinementSuite):
    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, real_smolvm, python_base):
        short = Path(tempfile.mkdtemp(prefix="bsv-"))  # a booting machine's sockets need a short path
        try:
            if os.environ.get("BOTTLE_TEST_KVM") == "1":
                env = real_smolvm.env | {"SMOLVM_VM_UID_DROP": "off"} if os.getuid() == 0 else real_smolvm.env
                yield SmolmachinesBackend(smolvm=Smolvm(real_smolvm.executable, env=env, state_dir=short))
            else:
                fake = fake_smolvm.install(short / "bin", short / "state", real_smolvm, python_base)
                try:
                    yield SmolmachinesBackend(smolvm=Smolvm(str(fake)))
                finally:
                    fake_smolvm.cleanup(short / "state")
        finally:
            shutil.rmtree(short, ignore_errors=True)

    @pytest.fixture(scope="class")
    @classmethod
    def agent_image(cls, python_base):
        return python_base
