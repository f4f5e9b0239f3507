"""`pio serve`: its parser (the server flags are derived from `ServerConfig`'s fields) and the
command. The server settings are checked before the model loads, so a bad flag is a one-line
error at once; the command returns 0 after a clean shutdown (SIGINT or SIGTERM)."""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES_SERVE = """examples:
  pio serve --model ~/models/qwen3-coder-30b
  pio serve --model ~/models/qwen3-coder-30b --served-model-name qwen3-coder-30b coder
  INFERENCE_PIO_API_KEY=secret pio serve --host 0.0.0.0 --port 8080 --allowed-hosts box.lan
  pio serve --allowed-origins http://localhost:3000 --max-tokens-limit 4096
  curl -s localhost:8000/v1/models

The API key may also come from $INFERENCE_PIO_API_KEY; clients then send
`Authorization: Bearer KEY`. The server answers to every --served-model-name, to --model as
given and to the model directory's name. Browsers: only loopback Host names (plus --host and
--allowed-hosts) are served, POST bodies must be JSON, and CORS is off unless
--allowed-origins is given.
"""


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `serve` command to `subparsers` (pio's sub-command parsers)."""
    from inference_pio.cli_common import add_engine_args, add_model_args
    from inference_pio.server.config import add_server_args

    serve: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve the model over an OpenAI-compatible HTTP API.",
        epilog=EXAMPLES_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(serve.add_argument_group("server"))
    add_model_args(serve)
    add_engine_args(serve)
    return serve


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the server settings, load the model, serve until interrupted; 0 on a clean stop."""
    from inference_pio import envs
    from inference_pio.cli_common import UsageError, load_llm

    try:
        from inference_pio.server import run_server
        from inference_pio.server.config import from_args
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("inference_pio"):
            raise  # a broken import inside the server is a bug: keep the traceback
        raise UsageError(f"pio serve is unavailable in this install ({e}); reinstall "
                             "inference-pio with its dependencies (pip install -e .)") from None
    try:
        config = from_args(args, api_key=args.api_key or envs.api_key())
    except ValueError as e:
        raise UsageError(str(e)) from None
    llm = load_llm(args)
    run_server(llm, config, model_arg=args.model)
    return 0
