"""The ``supportbot`` command: run the service, chat in a terminal, check config, and the
offline tools (fine-tuning and evaluation) under ``finetune`` and ``eval``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from typing import Any

from core.config import ConfigError, Settings, load_settings
from core.logs import configure_logging, secret_values

# name -> module implementing configure(parser) and run(args) -> int
OFFLINE_TOOLS: dict[str, dict[str, str]] = {
    "finetune": {
        "sentiment": "finetune.sentiment",
        "sentiment-head": "finetune.sentiment_head",
        "generator": "finetune.generator",
        "acts": "finetune.acts",
    },
    "eval": {
        "sentiment": "finetune.eval_sentiment",
        "escalation": "finetune.eval_escalation",
        "retrieval": "finetune.eval_retrieval",
        "grounding": "finetune.eval_grounding",
        "recommender": "finetune.eval_recommender",
        "generator": "finetune.eval_generator",
        "replay": "finetune.eval_replay",
        "acts": "finetune.acts",
    },
    "export": {
        "events": "finetune.export_events",
        "conversations": "finetune.export_conversations",
    },
}
# top-level commands implemented the same way
TOP_LEVEL_TOOLS: dict[str, str] = {"report": "bots.report"}


def secret_env_names(settings: Settings) -> list[str]:
    """Every environment variable a ``*_env`` key names: their values are masked in logs."""
    names = []
    for section in vars(settings).values():
        for key, value in vars(section).items() if hasattr(section, "__dict__") else ():
            if key.endswith("_env") and isinstance(value, str) and value:
                names.append(value)
    return names


def setup_logging(settings: Settings) -> None:
    s = settings.service
    configure_logging(
        level=s.log_level, fmt=s.log_format, redact=s.redact_logs,
        secrets=secret_values(secret_env_names(settings)),
    )


def _settings(path: str) -> Settings:
    settings = load_settings(path)
    setup_logging(settings)
    return settings


def _cmd_run(args: argparse.Namespace) -> int:
    from bots.service import Service

    settings = _settings(args.config)
    asyncio.run(Service(settings).run_until_signalled())
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from adapters.terminal import TerminalAdapter
    from bots.service import Service

    settings = _settings(args.config)
    logging.getLogger().setLevel(logging.WARNING)
    terminal = TerminalAdapter()

    async def main() -> None:
        service = Service(settings, adapters=[terminal])
        await service.start()
        try:
            await terminal.done.wait()
        finally:
            await service.stop()

    asyncio.run(main())
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from bots.service import build_adapters

    settings = load_settings(args.config)
    build_adapters(settings)
    enabled = [n for n in ("web", "telegram", "discord") if getattr(settings, n).enabled]
    print(f"{args.config}: OK (adapters: {', '.join(enabled) or 'none'}; "
          f"generator: {settings.generator.backend} {settings.generator.model})")
    return 0


def _add_tool(parsers: Any, name: str, module_name: str) -> None:
    """A tool module implements ``configure(parser)`` and ``run(args) -> int``."""
    module = importlib.import_module(module_name)
    p = parsers.add_parser(name, help=(module.__doc__ or "").strip().split("\n")[0])
    module.configure(p)
    p.set_defaults(handler=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supportbot", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in (
        ("run", _cmd_run, "start every enabled adapter"),
        ("chat", _cmd_chat, "chat with the bot in this terminal"),
        ("check-config", _cmd_check, "validate the config file and exit"),
    ):
        p = commands.add_parser(name, help=text)
        p.add_argument("--config", default="config.toml", help="path of config.toml")
        p.set_defaults(handler=fn)
    for name, module_name in TOP_LEVEL_TOOLS.items():
        _add_tool(commands, name, module_name)
    for group, tools in OFFLINE_TOOLS.items():
        g = commands.add_parser(group, help=f"offline tools: {', '.join(tools)}")
        sub = g.add_subparsers(dest="tool", required=True)
        for tool, module_name in tools.items():
            _add_tool(sub, tool, module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
