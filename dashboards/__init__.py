"""stacklens' Grafana dashboards as code (``python -m dashboards.generate``)."""
