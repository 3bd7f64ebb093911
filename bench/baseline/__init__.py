"""The naive baseline: nginx round-robin + a /health polling script (bench/baseline/)."""
