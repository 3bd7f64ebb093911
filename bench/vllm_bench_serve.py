"""`python -m bench.vllm_bench_serve ARGS`: vLLM's own benchmark client, `vllm bench serve`.

The `vllm` console script cannot start on this CPU build (it reads vLLM's package metadata, which
the build does not install), and `python -m vllm.benchmarks.serve` defines no entry point, so this
module builds vLLM's own argument parser and calls its `main`: the same client, the same flags."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from vllm.benchmarks.serve import add_cli_args
        from vllm.benchmarks.serve import main as serve_main
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as e:
        print(f"vLLM is not installed ({e}): `make install` installs its CPU build", file=sys.stderr)
        return 2

    parser = FlexibleArgumentParser(  # type: ignore[no-untyped-call]  # vLLM's own class, untyped
        prog="vllm bench serve", description="vLLM's benchmark client"
    )
    add_cli_args(parser)
    serve_main(parser.parse_args(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
