"""A SIMULATED OpenAI-compatible engine (`ernie-mesh sim-engine`): vLLM's endpoints, metric names and
failure behaviours (hang with /health 200, hang after headers, slow, error rate, crash, SIGTERM
abort or drain), with deterministic output. For integration tests, drills and benchmarks only;
it never stands in for vLLM where vLLM is the point.

Modules: `faults` (fault modes), `tokens` (the simulated tokenizer and chat template), `protocol`
(request validation), `wire` (vLLM's response shapes), `metrics` (vLLM names), `prefix_cache`
(an LRU of prompt blocks counted as vLLM's prefix caching), `engine` (requests, pacing, shutdown),
`app` (ASGI routes), `server` (uvicorn + signals), `cli` (the command), `process`
(`SimEngineProcess`, to run one as a subprocess).
"""
