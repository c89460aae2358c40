"""KV cache: the page allocator and radix prefix cache (plain Python), the pool's tensors, and transfer backends."""
