"""routed."""
