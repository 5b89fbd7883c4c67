"""``rotatord`` command line: parse, dispatch, and turn errors into one line and an exit code."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from ..errors import ConfigError, RotatordError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"rotatord: error: {message}\n")
        sys.exit(64)


_CONFIG_HELP = "configuration file (default: $ROTATORD_CONFIG, then /etc/rotatord/config.toml)"


def build_parser() -> argparse.ArgumentParser:
    # -c/--config is accepted before and after the command.  The sub-commands' copy defaults to
    # SUPPRESS: a sub-parser's default would otherwise overwrite a value given before the command.
    common = _Parser(add_help=False)
    common.add_argument("-c", "--config", metavar="PATH", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    parser = _Parser(prog="rotatord", description="Secrets and key-rotation daemon.")
    parser.add_argument("-c", "--config", metavar="PATH", default=None, help=_CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("run", parents=[common], help="run the daemon (foreground; systemd Type=notify)")
    sub.add_parser("init", parents=[common], help="create the state directory, database and master keys")
    sub.add_parser("check-config", parents=[common], help="validate the configuration and the files it references")

    p = sub.add_parser("rotate", parents=[common], help="rotate a secret now")
    p.add_argument("name")
    p.add_argument(
        "--emergency",
        action="store_true",
        help="a key leaked: no propagation wait, no grace period (the census still applies); needs --reason; "
        "prints the blast-radius report, live on a terminal; clears drift by accepting the current document first",
    )
    p.add_argument("--reason", help="why (recorded in the audit log; required with --emergency)")
    p.add_argument("--offline", action="store_true", help="run in this process while the daemon is down")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("rollback", parents=[common], help="put the previous primary back while it is in the ring")
    p.add_argument("name")
    p.add_argument("--reason")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "adopt", parents=[common], help="accept a secret's current document after drift (validated first)"
    )
    p.add_argument("name")
    p.add_argument("--reason", help="why (recorded in the audit log)")
    p.add_argument("--offline", action="store_true", help="run in this process while the daemon is down")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", parents=[common], help="version, phase, age and next rotation of each secret")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("history", parents=[common], help="the rotations of one secret")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("census", parents=[common], help="count each data store's items per key, now")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("reencrypt", parents=[common], help="resume or force re-encryption of a secret's data")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("webhooks", parents=[common], help="webhook deliveries: list, replay")
    hooks = p.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION", parser_class=_Parser)
    w = hooks.add_parser("list", parents=[common], help="deliveries, newest first, and each consumer's state")
    w.add_argument("--consumer")
    w.add_argument("--status", choices=["pending", "delivered", "dead", "skipped"])
    w.add_argument("--json", action="store_true")
    w = hooks.add_parser("replay", parents=[common], help="send again, with the original webhook id")
    w.add_argument("--id", dest="webhook_id", help="one delivery (msg_...)")
    w.add_argument("--consumer", help="a consumer's dead deliveries")
    w.add_argument("--since", help="with --consumer: only those created since (ISO 8601)")
    w.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "scan",
        parents=[common],
        help="find rotatord tokens and managed keys in files; say whose they are and if still valid",
        description="Exit 0: nothing found; 1: findings; 2: nothing found but the scan was incomplete.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or directories (symlinks inside are not followed)")
    p.add_argument("--max-size", type=float, default=64.0, metavar="MIB", help="skip larger files (default 64)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("audit", parents=[common], help="audit log tools")
    audit_sub = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION", parser_class=_Parser)
    v = audit_sub.add_parser("verify", parents=[common], help="check the audit log's hash chain")
    v.add_argument("--json", action="store_true")
    return parser


#: command -> "module:function" in this package.  Only the chosen command's module is imported,
#: so a usage error or ``check-config`` does not pay for the engine, SQLAlchemy and APScheduler.
COMMANDS = {
    "run": "daemon_cmds:run",
    "init": "daemon_cmds:init",
    "check-config": "daemon_cmds:check_config",
    "rotate": "rotation_cmds:rotate",
    "rollback": "rotation_cmds:rollback",
    "adopt": "rotation_cmds:adopt",
    "status": "rotation_cmds:status",
    "history": "rotation_cmds:history",
    "audit": "audit_cmds:audit",
    "census": "data_cmds:census",
    "webhooks": "webhook_cmds:webhooks",
    "reencrypt": "data_cmds:reencrypt",
    "scan": "scan_cmds:scan",
}


def command(name: str) -> Callable[[argparse.Namespace], int]:
    module_name, _, function = COMMANDS[name].partition(":")
    module = importlib.import_module(f".{module_name}", __package__)
    handler: Callable[[argparse.Namespace], int] = getattr(module, function)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return command(args.command)(args)
    except ConfigError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"rotatord: config error: {problem}\n")
        return exc.exit_code
    except RotatordError as exc:
        sys.stderr.write(f"rotatord: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
