"""stacklens node agent: samples GPUs (NVML or simulated), the host and GPU placement, and exports
them over OTLP and a Prometheus /metrics endpoint."""

__version__ = "0.1.0"
