"""Who may publish and subscribe what on the bus: the roles × subjects matrix, in one table.

Five roles (DESIGN.md, "Security model"). Every identity on the bus has one role and a name; the name is a subject
token, and it is what makes a client's traffic its own:

* a client publishes ``generate.<name>`` and ``cancel.<name>`` only — the server enforces the last token, so a router
  reading ``generate.<name>`` knows who sent it — and reads only ``_INBOX.<name>.>``, the inbox prefix its
  connection uses (``inbox_prefix`` in nats-py). Routers refuse a reply subject outside the sender's prefix and
  honour a cancel only from the request's sender; engines hear cancels from routers alone.
* services (router, engine) publish into any inbox: the streams they write are the clients'.

Nothing else spells a permission: :func:`permissions` turns the table into one identity's grants,
``busserve.security.server_config`` turns those into a nats-server ``authorization`` block, and the table in
docs/SECURITY.md is :func:`matrix_markdown` (a test keeps it current).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from busserve.bus.subjects import Subjects

Role = Literal["client", "router", "engine", "strategy", "operator"]
ROLES: tuple[Role, ...] = ("client", "router", "engine", "strategy", "operator")

# Engine actions a separate strategy process composes; it may not abort, drain, migrate or change roles.
STRATEGY_ACTIONS = ("generate", "prep_recv", "remote_send", "start_generate", "renew", "probe", "kv_snapshot")
ROUTER_ACTIONS = (*STRATEGY_ACTIONS, "abort", "migrate")
OPERATOR_ACTIONS = ("drain", "set_roles", "probe", "generate")  # generate: `busserve generate --engine`


@dataclass(frozen=True)
class Rule:
    """One subject pattern and the roles that may publish / subscribe it. ``{name}`` is the identity's own name,
    ``{bucket}`` the config bucket; NATS wildcards (``*``, ``>``) as in the server's config."""

    subject: str
    publish: tuple[Role, ...]
    subscribe: tuple[Role, ...]
    why: str


def rules(subjects: Subjects) -> list[Rule]:
    """The matrix for one subject prefix."""
    root = subjects.root
    kv = "$KV.{bucket}"
    api = "$JS.API"
    stream = "KV_{bucket}"
    return [
        Rule(f"{root}.generate.{{name}}", ("client", "router"), (), "a request, from its owner"),
        Rule(f"{root}.generate.*", (), ("router",), "routers take requests (queue group)"),
        Rule(f"{root}.generate", (), ("router",), "open servers only: on a secured one nobody may publish it"),
        Rule(f"{root}.cancel.{{name}}", ("client", "router"), (), "a cancel, from the request's owner"),
        Rule(f"{root}.cancel.*", (), ("router",), "routers check the owner"),
        Rule(f"{root}.cancel", ("router",), ("engine", "router"), "routers pass an owner's cancel to engines"),
        Rule(f"{root}.resend.{{name}}", ("client",), (), "events of one's own stream again (after a gap or an outage)"),
        Rule(f"{root}.resend.*", (), ("router",), "routers find the stream of the owner's request"),
        Rule(f"{root}.resend", ("router",), ("engine", "router"), "routers ask engines to publish a stream again"),
        Rule("_INBOX.{name}.>", (), ROLES, "the identity's own inbox: replies and its streams"),
        Rule("_INBOX.>", ("router", "engine"), ("router",),
             "token streams and replies to anyone who asked; a router follows the streams it routes (to resume them)"),
        Rule("_R_.>", ("router", "engine"), ("router",),
             "the same for a tenant's client: the server maps these replies into the asking tenant's account"),
        Rule(f"{root}.router.*.ping", ("router",), (), "is this router id taken? (asked before serving under it)"),
        Rule(f"{root}.router.{{name}}.ping", (), ("router",), "a router answers under its own id"),
        Rule(f"{root}.routers.status", ("router",), ("client", "router", "operator"),
             "router heartbeats (a client watches the router holding its request)"),
        Rule(f"{root}.engines.status", ("engine",), ("router", "strategy", "operator"), "engine heartbeats"),
        Rule(f"{root}.engines.{{name}}.kv", ("engine",), (), "an engine's own KV events"),
        Rule(f"{root}.engines.*.kv", (), ("router", "strategy"), "every engine's KV events (cache-aware routing)"),
        Rule(f"{root}.kv.*", ("engine",), (), "KV data written into a peer (bus transport)"),
        Rule(f"{root}.kv.{{name}}", (), ("engine",), "KV data written into this engine"),
        Rule(f"{root}.nvshmem.*.id", ("engine",), ("engine",), "NVSHMEM unique-id bootstrap"),
        *[Rule(f"{root}.engine.*.{a}", _senders_of(a), (), f"engine action {a}")
          for a in dict.fromkeys(ROUTER_ACTIONS + OPERATOR_ACTIONS)],
        Rule(f"{root}.engine.{{name}}.*", (), ("engine",), "an engine hears its own actions only"),
        Rule(f"{root}.engine.{{name}}.probe", ("engine",), (), "is this engine id taken? (asked before serving)"),
        Rule(f"{root}.strategy.*", ("router",), ("strategy",), "routers hand requests to strategy processes"),
        Rule(f"{root}.control.strategy", ("operator",), ("router",), "switch the strategy (a router answers)"),
        Rule("$SRV.>", ("operator",), ("router", "engine", "strategy"),
             "NATS services discovery (`$SRV.PING/INFO/STATS`, busserve.bus.nats_service): the services answer"),
        # The live configuration (JetStream key-value): services and operators read it; routers and operators
        # write the strategy, operators the roles.
        Rule(f"{api}.INFO", ("router", "engine", "operator"), (), "JetStream account info"),
        Rule(f"{api}.STREAM.CREATE.{stream}", ("router", "engine", "operator"), (), "create the config bucket"),
        Rule(f"{api}.STREAM.INFO.{stream}", ("router", "engine", "operator"), (), "open the config bucket"),
        Rule(f"{api}.STREAM.MSG.GET.{stream}", ("router", "engine", "operator"), (), "read a key"),
        Rule(f"{api}.DIRECT.GET.{stream}.>", ("router", "engine", "operator"), (), "read a key"),
        Rule(f"{api}.CONSUMER.CREATE.{stream}", ("router", "engine", "operator"), (), "watch a key"),
        Rule(f"{api}.CONSUMER.CREATE.{stream}.>", ("router", "engine", "operator"), (), "watch a key"),
        Rule(f"{api}.CONSUMER.INFO.{stream}.>", ("router", "engine", "operator"), (), "watch a key"),
        Rule(f"{api}.CONSUMER.DELETE.{stream}.>", ("router", "engine", "operator"), (), "stop watching"),
        Rule(f"$JS.FC.{stream}.>", ("router", "engine", "operator"), (), "watch flow control"),
        Rule(f"{kv}.strategy", ("router", "operator"), (), "the active strategy"),
        Rule(f"{kv}.roles.*", ("operator",), (), "engine roles"),
    ]


def _senders_of(action: str) -> tuple[Role, ...]:
    grants: tuple[tuple[Role, tuple[str, ...]], ...] = (
        ("router", ROUTER_ACTIONS), ("strategy", STRATEGY_ACTIONS), ("operator", OPERATOR_ACTIONS))
    return tuple(role for role, actions in grants if action in actions)


@dataclass(frozen=True)
class Permissions:
    publish: list[str]
    subscribe: list[str]
    # A strategy process answers routers' requests: it may publish to the reply subject of what it received.
    allow_responses: bool = False


def permissions(role: Role, name: str, subjects: Subjects) -> Permissions:
    """The grants of one identity (``name``: its user name, a subject token)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    subjects.inbox_prefix(name)  # checks that the name is a subject token
    bucket = subjects.config_bucket()

    def fill(pattern: str) -> str:
        return pattern.replace("{name}", name).replace("{bucket}", bucket)

    table = rules(subjects)
    pub = [fill(r.subject) for r in table if role in r.publish]
    sub = [fill(r.subject) for r in table if role in r.subscribe]
    return Permissions(publish=pub, subscribe=sub, allow_responses=role == "strategy")


def matrix_markdown(subjects: Subjects) -> str:
    """The matrix as a Markdown table (P: may publish, S: may subscribe)."""
    head = "| subject | " + " | ".join(ROLES) + " | what for |"
    rows = [head, "|" + "---|" * (len(ROLES) + 2)]
    for r in rules(subjects):
        cells = ["".join(("P" if role in r.publish else "") + ("S" if role in r.subscribe else "")) or "·"
                 for role in ROLES]
        rows.append(f"| `{r.subject}` | " + " | ".join(cells) + f" | {r.why} |")
    return "\n".join(rows) + "\n"
