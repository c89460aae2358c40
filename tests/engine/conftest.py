"""Engine test fixtures live in tests/conftest.py (the models are shared with the KV and router tests)."""
