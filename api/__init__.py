"""The read side: serves dashboards from Redis alone."""
