"""Loaded by every Python interpreter that has this directory on its path (tests/faults.py: ``hooks_env``): installs
the faults the environment asks for in the processes a test's flow run starts (steps, torchrun ranks). Test-only."""

from tests.faults import install_from_environment

install_from_environment()
