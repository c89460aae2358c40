"""``busserve bench``: an open-loop load generator with vLLM-compatible metrics (see ``metrics``)."""
