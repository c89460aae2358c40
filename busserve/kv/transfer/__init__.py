"""KV transfer backends behind one interface (``base``): ``shm`` (same host), ``bus`` (NATS), ``nvshmem`` (GPU)."""
