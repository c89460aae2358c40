"""Every NATS subject busserve uses, built in one place. Nothing else spells a subject.

``Subjects("busserve")`` gives the v1 layout of DESIGN.md::

    busserve.v1.generate                         client → router (queue group), reply-to = stream subject
    busserve.v1.cancel                           client → routers and engines
    busserve.v1.strategy.<name>                  router → strategy process (queue group)
    busserve.v1.engine.<id>.<action>             strategy → engine, request-reply
    busserve.v1.engines.status                   engine heartbeats
    busserve.v1.engines.<id>.kv                  engine KV events
    busserve.v1.kv.<id>                          KV data chunks for engine <id> (bus transport)
    busserve.v1.routers.status                   router heartbeats
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

    # client-facing
    def generate(self) -> str:
        return f"{self.root}.generate"

    def cancel(self) -> str:
        return f"{self.root}.cancel"

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

    # JetStream key-value bucket holding the live configuration (active strategy, engine roles)
    def config_bucket(self) -> str:
        return f"{self.prefix.replace('.', '_')}_{self.version}_config"

    @staticmethod
    def action_of(subject: str) -> str:
        """The last token of an engine action subject."""
        return subject.rsplit(".", 1)[-1]
