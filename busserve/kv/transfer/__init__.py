"""KV transfer backends behind one interface (``base``): ``shm`` (CPU pools on one host), ``cuda_ipc`` (GPU pools on
one host), ``bus`` (NATS, anywhere; device pools staged through host memory), ``mooncake`` (Mooncake's Transfer
Engine between hosts); ``nvshmem`` is its bootstrap and availability check so far."""
