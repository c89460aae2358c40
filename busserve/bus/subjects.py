"""Every NATS subject busserve uses, built in one place. Nothing else spells a subject.

``Subjects("busserve")`` gives the v1 layout of DESIGN.md::

    busserve.v1.generate.<owner>                 client → router (queue group), reply-to = stream subject
    busserve.v1.cancel.<owner>                   client → routers (only the request's owner cancels it)
    busserve.v1.resend.<owner>                   client → routers: events of its stream again, from an index
    busserve.v1.generate, busserve.v1.cancel     the same without an owner, on open servers; routers pass
    busserve.v1.resend                           cancels and resends on to engines on the bare subjects
    _INBOX.<owner>.>                             an identity's replies and token streams
    _R_.<id>                                     the same for a tenant's client (the server's import reply mapping)
    busserve.v1.strategy.<name>                  router → strategy process (queue group)
    busserve.v1.engine.<id>.<action>             strategy → engine, request-reply
    busserve.v1.engines.status                   engine heartbeats
    busserve.v1.engines.<id>.kv                  engine KV events
    busserve.v1.kv.<id>                          KV data chunks for engine <id> (bus transport)
    busserve.v1.routers.status                   router heartbeats
    busserve.v1.router.<id>.ping                 answered by the router with that id (id collision check)
    busserve.v1.control.strategy                 SetStrategy, answered by a router
    busserve.v1.stream.<request_id>              default stream subject for clients that do not pick one
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

EngineAction = Literal["generate", "prep_recv", "remote_send", "start_generate", "abort", "renew", "probe",
                       "migrate", "drain", "set_roles", "kv_snapshot"]
ENGINE_ACTIONS: tuple[EngineAction, ...] = (
    "generate",
    "prep_recv",
    "remote_send",
    "start_generate",
    "abort",
    "renew",
    "probe",
    "migrate",
    "drain",
    "set_roles",
    "kv_snapshot",
)

# A real token, or a ``{name}`` placeholder (used only when documenting subjects in the AsyncAPI export).
_TOKEN = re.compile(r"^([A-Za-z0-9_\-:]+|\{[A-Za-z_]+\})$")


_IMPORT_REPLY_PREFIX = "_R_."  # nats-server's prefix for the reply subjects of service imports


def _token(value: str, what: str) -> str:
    """A subject token must not contain dots, wildcards or whitespace."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} cannot be used in a subject (letters, digits, '_', '-', ':' only)")
    return value


@dataclass(frozen=True)
class Subjects:
    prefix: str = "busserve"
    version: str = "v1"

    def __post_init__(self) -> None:
        for part in self.prefix.split("."):
            _token(part, "subject prefix part")

    @property
    def root(self) -> str:
        return f"{self.prefix}.{self.version}"

    # client-facing. ``owner``: the sender's identity (its NATS user name). A secured server lets each client
    # publish only under its own name, so the last token tells routers who sent a request or a cancel; on an
    # open server clients use the bare subjects (owner "").
    def generate(self, owner: str = "") -> str:
        return f"{self.root}.generate.{_token(owner, 'owner')}" if owner else f"{self.root}.generate"

    def cancel(self, owner: str = "") -> str:
        return f"{self.root}.cancel.{_token(owner, 'owner')}" if owner else f"{self.root}.cancel"

    def resend(self, owner: str = "") -> str:
        """A client's Resend (owner-named, to routers); bare: a router's ResendStream to engines."""
        return f"{self.root}.resend.{_token(owner, 'owner')}" if owner else f"{self.root}.resend"

    def resend_any_owner(self) -> str:
        return f"{self.root}.resend.*"

    def generate_any_owner(self) -> str:
        return f"{self.root}.generate.*"

    def cancel_any_owner(self) -> str:
        return f"{self.root}.cancel.*"

    def owner_of(self, subject: str) -> str:
        """The owner token of a generate / cancel subject ("" for the bare ones)."""
        for base in (f"{self.root}.generate.", f"{self.root}.cancel.", f"{self.root}.resend."):
            if subject.startswith(base):
                return subject[len(base):]
        return ""

    @staticmethod
    def inbox_prefix(owner: str) -> str:
        """The inbox prefix of an identity: its replies and streams arrive under ``<prefix>.>`` (``_INBOX`` for an
        anonymous one, as in every NATS client)."""
        return f"_INBOX.{_token(owner, 'identity')}" if owner else "_INBOX"

    @staticmethod
    def in_inbox_of(owner: str, subject: str) -> bool:
        """Whether ``subject`` lies in ``owner``'s inbox space — the only place a router streams an owner's tokens."""
        return subject.startswith(f"_INBOX.{owner}.") and len(subject) > len(owner) + 8

    @staticmethod
    def is_import_reply(subject: str) -> bool:
        """Whether ``subject`` is the server's reply mapping of a request that came through a service import (a
        tenant's client): ``_R_.<id>``, which the server delivers to the requester's own reply in its own account
        and to nothing else."""
        return subject.startswith(_IMPORT_REPLY_PREFIX) and len(subject) > len(_IMPORT_REPLY_PREFIX)

    def stream(self, request_id: str) -> str:
        return f"{self.root}.stream.{_token(request_id, 'request id')}"

    # strategies
    def strategy(self, name: str) -> str:
        return f"{self.root}.strategy.{_token(name, 'strategy name')}"

    def control_strategy(self) -> str:
        return f"{self.root}.control.strategy"

    # engines
    def engine_action(self, engine_id: str, action: EngineAction) -> str:
        return f"{self.root}.engine.{_token(engine_id, 'engine id')}.{action}"

    def engine_actions_wildcard(self, engine_id: str) -> str:
        return f"{self.root}.engine.{_token(engine_id, 'engine id')}.*"

    def engines_status(self) -> str:
        return f"{self.root}.engines.status"

    def engine_kv_events(self, engine_id: str) -> str:
        return f"{self.root}.engines.{_token(engine_id, 'engine id')}.kv"

    def all_kv_events(self) -> str:
        return f"{self.root}.engines.*.kv"

    def kv_data(self, engine_id: str) -> str:
        return f"{self.root}.kv.{_token(engine_id, 'engine id')}"

    def nvshmem_bootstrap(self, group: str) -> str:
        return f"{self.root}.nvshmem.{_token(group, 'nvshmem group')}.id"

    # routers
    def routers_status(self) -> str:
        return f"{self.root}.routers.status"

    def router_ping(self, router_id: str) -> str:
        """Answered by the router serving under this id (an Ack): how a new router learns its id is taken."""
        return f"{self.root}.router.{_token(router_id, 'router id')}.ping"

    # JetStream key-value bucket holding the live configuration (active strategy, engine roles)
    def config_bucket(self) -> str:
        return f"{self.prefix.replace('.', '_')}_{self.version}_config"

    @staticmethod
    def action_of(subject: str) -> str:
        """The last token of an engine action subject."""
        return subject.rsplit(".", 1)[-1]
