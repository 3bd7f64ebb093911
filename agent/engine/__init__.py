"""Engine role: supervise local vLLM servers, decide their health from facts, keep Consul told."""
