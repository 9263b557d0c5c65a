"""The `modelyard` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from types import FrameType

from modelyard.chat.template import TemplateError
from modelyard.config import ConfigError, load_config, with_overrides
from modelyard.engine.runner import RunnerError
from modelyard.models import ModelSourceError
from modelyard.platform.accounts import AdminError
from modelyard.platform.commands import add_commands, run
from modelyard.platform.money import AmountError
from modelyard.platform.service import PlatformUnavailable

H11_MAX_INCOMPLETE_EVENT_BYTES = 64 * 1024
"""The most bytes of a request line and headers buffered before they are complete (when
uvicorn runs its h11 parser)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelyard",
                                     description="A self-hosted OpenAI-compatible LLM API.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the chat completions API")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--model", help="model source: pypi:NAME, a .gguf path, or "
                       "hf:OWNER/REPO/FILE.gguf (default: the packaged Qwen2.5-Coder 0.5B)")
    serve.add_argument("--model-id", help="the id clients use for the model")
    serve.add_argument("--config", type=Path, help="a TOML config file")
    add_commands(commands)
    return parser


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from modelyard.server import build_app

    config = with_overrides(load_config(args.config), host=args.host, port=args.port,
                            model=args.model, model_id=args.model_id)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(config)
    limits = config.server
    from modelyard.api.shutdown import SHUTTING_DOWN

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            SHUTTING_DOWN.set()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level,
        access_log=False, limit_concurrency=2 * limits.limit_concurrency,
        timeout_keep_alive=max(1, round(limits.timeout_keep_alive_seconds)),
        timeout_graceful_shutdown=round(limits.graceful_shutdown_seconds),
        h11_max_incomplete_event_size=H11_MAX_INCOMPLETE_EVENT_BYTES)).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        return run(args)
    except (ConfigError, ModelSourceError, TemplateError, PlatformUnavailable, AmountError,
            AdminError, RunnerError) as exc:
        print(f"modelyard: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
