"""ernie-mesh: high availability for vLLM, driven by service discovery."""

__version__ = "0.1.0"
