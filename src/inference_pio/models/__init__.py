"""Model code keyed by architecture, product plugins keyed by name (see models.registry)."""
