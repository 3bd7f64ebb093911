"""The resuming relay: a process of the gateway role between Envoy's edge listener and Envoy's
engine hop, for the generation routes (/v1/chat/completions, /v1/completions).

It relays each engine's SSE stream to the client as it comes, remembers the token IDs it relayed,
and when the stream breaks (engine killed, host gone, EOF without a final chunk, a vLLM `abort`
chunk, a mid-stream error event) or the engine hangs (its instance leaves the gateway's snapshot
while the request makes no progress), it continues the generation on another instance from
exactly those tokens and splices the continuation into the same client stream.

    sse.py         SSE framing and the few byte-level facts read per event (pure)
    request.py     the client's request: resumable or not, what goes upstream (pure)
    transcript.py  what was relayed; continuation requests; chunks in the client's shape (pure)
    affinity.py    the request's affinity key (Envoy's Maglev hash) and the resume order (pure)
    membership.py  the instances the gateway's snapshot has, and the attempts running on each
    ads_client.py  an ADS (EDS) client of the gateway agent: the snapshot, as Envoy gets it
    upstream.py    one attempt through Envoy's engine hop (a unix socket)
    handler.py     one client request: attempts, resumes, the client stream
    server.py      the aiohttp server and the process entry point (`ernie-mesh relay`)
    metrics.py     resumes by reason and outcome, time to resume, tokens replayed

docs/gateway.md ("Resuming relay") explains the design and the exactness argument.
"""
