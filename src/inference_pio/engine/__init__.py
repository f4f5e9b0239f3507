"""Request lifecycle: requests, scheduling and the engine loop (no torch here)."""
