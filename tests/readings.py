"""The readings of connexus-api.txt's delivery report, as a parametrized `connexus` fixture.

The document does not say which id a report carries (Connexus's own `message_id`, or the
`messageId` the client sent) nor that `timestamp` and `details` are always present: a module
that imports `reading_connexus` from here gets it as its `connexus` fixture and runs its tests
under every reading of the emulator.
"""

from __future__ import annotations

import pytest

from bc_proxy.connexus.emulator import Emulator, create_emulator_app
from tests.conftest import CLIENT_ID, CLIENT_SECRET, AiohttpServer, Connexus

READINGS = {
    "connexus-id": ("connexus", True, True),
    "client-id": ("client", True, True),
    "connexus-id-bare": ("connexus", False, False),
    "client-id-bare": ("client", False, False),
}
# For tests whose subject does not depend on the reading (timing, polling, push mechanics).
ONE_READING = pytest.mark.parametrize("connexus", ["connexus-id"], indirect=True)


@pytest.fixture(name="connexus", params=list(READINGS))
async def reading_connexus(
    request: pytest.FixtureRequest, aiohttp_server: AiohttpServer
) -> Connexus:
    """The Connexus emulator on a real loopback port, under one reading of its reports."""
    dlr_id, timestamp, details = READINGS[request.param]
    emu = Emulator(
        clients={CLIENT_ID: CLIENT_SECRET, "cid_other": "csk_other"},
        dlr_id=dlr_id,  # type: ignore[arg-type]
        dlr_timestamp=timestamp,
        dlr_details=details,
    )
    server = await aiohttp_server(create_emulator_app(emu), host="127.0.0.1")
    return Connexus(emu, server)
