"""Unique identities on one bus: an engine or router id is checked before the process serves under it.

Two processes under one id would both act on every action sent to it (an engine's action subjects are not a queue
group) and the cluster view would merge their heartbeats. So a process asks its own subject first — an engine its
probe action, a router its ping subject: one already there answers, nobody does when the id is free (NATS says
"no responders" at once). Ids chosen by busserve are unique by construction (:func:`host_scoped_id`).
"""

from __future__ import annotations

import secrets
import socket
from typing import Any

from busserve.bus.client import Bus
from busserve.errors import BusserveError, NoResponders, RequestTimeout
from busserve.messages import Ack, Probe, ProbeReply


class IdInUse(BusserveError):
    code = "conflict"


class IdNotOwned(IdInUse):
    """On a secured bus a process serves under its identity's name: its grants are for subjects of that name."""


def host_scoped_id(kind: str) -> str:
    """``<kind>-<host>-<random>``: unique across hosts (the host name) and across restarts on one (the suffix)."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname().split(".")[0])[:24]
    return f"{kind}-{host or 'host'}-{secrets.token_hex(2)}"


async def check_engine_id_free(bus: Bus, engine_id: str, timeout_s: float = 3.0) -> None:
    """Raise :class:`IdInUse` if an engine already serves as ``engine_id`` on this bus."""
    await _check_free(bus, bus.subjects.engine_action(engine_id, "probe"), Probe(request_id="-"), ProbeReply,
                      "engine", engine_id, timeout_s)


async def check_router_id_free(bus: Bus, router_id: str, timeout_s: float = 3.0) -> None:
    """Raise :class:`IdInUse` if a router already answers on ``router_id``'s ping subject."""
    await _check_free(bus, bus.subjects.router_ping(router_id), Ack(), Ack, "router", router_id, timeout_s)


async def _check_free(bus: Bus, subject: str, ask: Any, reply: type[Any], kind: str, wanted: str,
                      timeout_s: float) -> None:
    what = f"{kind} id {wanted!r}"
    if bus.owner and bus.owner != wanted:
        raise IdNotOwned(f"{what} is not this connection's identity {bus.owner!r}: on a secured bus a process serves "
                         f"under its identity's name (--id {bus.owner}, or issue an identity named {wanted!r}: "
                         "`busserve security add`)", field="id")
    try:
        await bus.request(subject, ask, reply, timeout_s=timeout_s)
    except NoResponders:
        return
    except RequestTimeout:
        raise IdInUse(f"{what}: something listens on its subject but does not answer; pick another --id",
                      field="id") from None
    except BusserveError:
        pass  # it answered, with an error: still somebody
    raise IdInUse(f"{what} is already serving on this bus; pick another --id", field="id")
