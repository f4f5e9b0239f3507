"""Small utilities (memory probing)."""
