"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
from hub_server import HubServer


@pytest.fixture
def hub_server(tmp_path):
    """A loopback Hugging Face Hub (``.endpoint``, ``.root``); stopped at teardown."""
    server = HubServer(tmp_path / "hub", lifetime_s=600.0).start()
    try:
        yield server
    finally:
        server.stop()
