"""busserve — LLM microserving over NATS.

Engines expose three sub-request actions (prep_recv, remote_send, start_generate); a programmable router composes
them into data parallel, prefill/decode disaggregation, balanced PD and KV migration. Router, engines and clients
talk only through msgspec messages on NATS subjects. Start at ``busserve/cli.py`` for the entry points, at
``busserve/messages.py`` for the wire contract, and at ``busserve/bus/subjects.py`` for who talks to whom.
"""

__version__ = "0.1.0"
