"""The programmable router: cluster view, strategies composing the microserving actions, and the HTTP front."""
