"""Isolation on the bus: the roles × subjects matrix (``roles``), the identities and the nats-server config
generated from it (``server_config``)."""
