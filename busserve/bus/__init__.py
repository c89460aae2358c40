"""The bus layer: connection settings, subjects, codec, client helpers and the embedded nats-server."""
