"""`ernie-mesh sim-engine`: run a SIMULATED OpenAI-compatible engine (not vLLM) for tests and drills."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os

from agent.sim.engine import (
    CRASH_EXIT_CODE,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_PREFILL_MS_PER_TOKEN,
    DEFAULT_TOKEN_DELAY_MS,
    EngineConfig,
    SimEngine,
)
from agent.sim.faults import DEFAULT_ERROR_RATE, DEFAULT_SLOW_FACTOR, FAULT_MODE_NAMES, Fault, FaultError, FaultMode
from agent.sim.prefix_cache import DEFAULT_BLOCK_SIZE, DEFAULT_CAPACITY_BLOCKS

log = logging.getLogger("agent.sim")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MODEL = "sim-model"
LOG_LEVELS = ("debug", "info", "warning", "error")

DESCRIPTION = """\
Run a SIMULATED inference engine: a small OpenAI-compatible server that mimics vLLM's API
(/v1/chat/completions, /v1/completions, /v1/models, /health, /version, /metrics with vLLM's
metric names) and its failure behaviours, but generates no real text (tokens are tok0 tok1 ...).
It is NOT vLLM: it exists so tests, drills and benchmarks can drive failures deterministically.

Fault modes (--fault at start; at run time, only with --allow-faults, POST /sim/fault {"mode": ...,
"slow_factor": 10, "error_rate": 0.5} and GET /sim/fault; counters at GET /sim/stats):
  none                nothing wrong
  hang                gray failure: /health 200 and /metrics served, but every generation stalls
  hang_after_headers  new requests get response headers, then nothing
  slow                per-token delay (and prefill) multiplied by slow_factor
  error_rate          a fraction error_rate of generation requests answered 500
  crash               the process exits at once with code 1
(--crash-on-prompt TEXT and --crash-at-start-if-exists PATH: a prompt of death, a crash loop.)

Timing and the prefix cache: each token comes --token-delay-ms after the one before; the first one
also waits --prefill-ms-per-token for every prompt token not in the prefix cache. The prefix cache
works like vLLM's automatic prefix caching: an LRU of --prefix-cache-blocks blocks of --block-size
tokens, a block a hit only when everything before it matches too (a chat prompt starts with its
system message: requests with the same long system prompt share its blocks). Counted in tokens on
/metrics (vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total) and in /sim/stats.

API keys as vLLM: --api-key KEY (repeatable), else the environment's VLLM_API_KEY; then /v1/...
needs Authorization: Bearer <key> (401 {"error": "Unauthorized"} without). --config FILE reads
flags from a YAML mapping as vLLM does ({"api-key": ["k1", "k2"], "max-num-seqs": 8}).

SIGTERM/SIGINT as vLLM: with --shutdown-timeout 0 requests in flight are aborted
(finish_reason "abort"); with --shutdown-timeout N they may finish for up to N s. Exit code 0.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ernie-mesh sim-engine", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=_port, required=True, help="TCP port to listen on")
    p.add_argument("--model", default=DEFAULT_MODEL, help="served model name (default %(default)s)")
    p.add_argument("--name", default=None, help="instance name, sent in the x-sim-engine header (default sim-<port>)")
    p.add_argument(
        "--token-delay-ms",
        type=_non_negative_float,
        default=DEFAULT_TOKEN_DELAY_MS,
        help="delay before each generated token, ms (default %(default)s)",
    )
    p.add_argument(
        "--prefill-ms-per-token",
        type=_non_negative_float,
        default=DEFAULT_PREFILL_MS_PER_TOKEN,
        metavar="MS",
        help="extra delay of the first token per prompt token not found in the prefix cache, ms (default %(default)s)",
    )
    p.add_argument(
        "--prefix-cache-blocks",
        type=_non_negative_int,
        default=DEFAULT_CAPACITY_BLOCKS,
        metavar="N",
        help="prefix cache capacity in blocks, least recently used evicted; 0 turns it off (default %(default)s)",
    )
    p.add_argument(
        "--block-size",
        type=_positive_int,
        default=DEFAULT_BLOCK_SIZE,
        help="tokens per prefix cache block, as vLLM's --block-size (default %(default)s)",
    )
    p.add_argument(
        "--crash-on-prompt",
        default="",
        metavar="TEXT",
        help="a generation request whose body contains TEXT crashes the engine before it answers "
        "(a prompt of death; drills and tests)",
    )
    p.add_argument(
        "--crash-at-start-if-exists",
        default="",
        metavar="PATH",
        help="exit with code 1 at start, before listening, while PATH exists (an engine that fails at "
        "boot: its supervisor's crash loop; drills remove the file to let it recover)",
    )
    p.add_argument(
        "--allow-faults",
        action="store_true",
        help="serve POST/GET /sim/fault (tests and drills: anyone who reaches it can crash or hang the engine)",
    )
    p.add_argument(
        "--fault",
        choices=FAULT_MODE_NAMES,
        default=FaultMode.NONE.value,
        help="fault mode at start (default %(default)s)",
    )
    p.add_argument(
        "--slow-factor",
        type=float,
        default=DEFAULT_SLOW_FACTOR,
        help="token delay and prefill multiplier of fault 'slow' (default %(default)s)",
    )
    p.add_argument(
        "--error-rate",
        type=float,
        default=DEFAULT_ERROR_RATE,
        help="fraction of generations failing under fault 'error_rate' (default %(default)s)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=_non_negative_float,
        default=0.0,
        metavar="S",
        help="on SIGTERM: 0 aborts requests in flight (vLLM's default); N lets them finish "
        "for up to N s (default %(default)s)",
    )
    p.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=DEFAULT_MAX_MODEL_LEN,
        help="context length: prompt + max_tokens above it is a 400 (default %(default)s)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=DEFAULT_MAX_NUM_SEQS,
        help="requests running at once; the rest wait (default %(default)s)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="require Authorization: Bearer KEY on /v1/... (repeatable; default: $VLLM_API_KEY, else none)",
    )
    p.add_argument("--config", metavar="FILE", help="flags from a YAML mapping, as vLLM's --config")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="(default %(default)s)")
    return p


def config_flags(path: str) -> list[str]:
    """vLLM's --config: a YAML mapping of flag names to values, as command-line flags (a list value
    is one flag followed by its items: how --api-key takes several keys)."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a YAML mapping of flags")
    out: list[str] = []
    for key, value in data.items():
        if isinstance(value, bool):
            out += [f"--{key}"] if value else []
        elif isinstance(value, list):
            for item in value:  # argparse's append: one flag per item
                out += [f"--{key}", str(item)]
        else:
            out += [f"--{key}", str(value)]
    return out


def expand_config(argv: list[str]) -> list[str]:
    """Flags from --config FILE first, the command line's after them (they win)."""
    if "--config" not in argv:
        return argv
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise ValueError("--config needs a file")
    return config_flags(argv[i + 1]) + argv[:i] + argv[i + 2 :]


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        argv = expand_config(argv)
    except Exception as e:  # unreadable, not YAML, not a mapping: a usage error (exit 2)
        parser.error(f"--config: {e}")
    args = parser.parse_args(argv)
    # as vLLM: --api-key wins over VLLM_API_KEY
    api_keys = tuple(k for k in (args.api_key or [os.environ.get("VLLM_API_KEY", "")]) if k)
    try:
        fault = Fault(mode=FaultMode(args.fault), slow_factor=args.slow_factor, error_rate=args.error_rate)
    except FaultError as e:
        parser.error(str(e))
    name = args.name or f"sim-{args.port}"
    logging.getLogger().setLevel(args.log_level.upper())
    if fault.mode is FaultMode.CRASH:
        log.error("simulated engine %s: started with fault crash, exiting with code %d", name, CRASH_EXIT_CODE)
        return CRASH_EXIT_CODE
    if args.crash_at_start_if_exists and os.path.exists(args.crash_at_start_if_exists):
        log.error(
            "simulated engine %s: %s exists (--crash-at-start-if-exists): failing at start with code %d",
            name,
            args.crash_at_start_if_exists,
            CRASH_EXIT_CODE,
        )
        return CRASH_EXIT_CODE
    engine = SimEngine(
        EngineConfig(
            name=name,
            model=args.model,
            token_delay_ms=args.token_delay_ms,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            crash_marker=args.crash_on_prompt,
            prefix_cache_blocks=args.prefix_cache_blocks,
            block_size=args.block_size,
            prefill_ms_per_token=args.prefill_ms_per_token,
        ),
        fault,
    )
    log.warning(
        "SIMULATED engine %s (not vLLM) serving model %r on http://%s:%d, fault %s, token delay %g ms, "
        "prefill %g ms per uncached token, prefix cache %s, %s",
        name,
        args.model,
        args.host,
        args.port,
        fault.mode.value,
        args.token_delay_ms,
        args.prefill_ms_per_token,
        f"{args.prefix_cache_blocks} blocks of {args.block_size} tokens" if args.prefix_cache_blocks else "off",
        f"{len(api_keys)} API key(s) required on /v1" if api_keys else "no API key",
    )
    from agent.sim.server import ServeOptions, serve  # uvicorn + starlette: not needed for --help or bad args

    options = ServeOptions(
        host=args.host,
        port=args.port,
        shutdown_timeout_s=args.shutdown_timeout,
        log_level=args.log_level,
        allow_faults=args.allow_faults,
        api_keys=api_keys,
    )
    code = asyncio.run(serve(engine, options))
    log.warning("simulated engine %s stopped (exit code %d)", name, code)
    return code
