"""``ctrlable-companion``: serve, sim, manifest check, build, demo."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from .logs import setup_logging
from .manifest import ManifestError, load_manifest, summary
from .settings import Settings, SettingsError

# Subcommands whose implementation lives in another module: name -> (module, help).
DELEGATED: dict[str, tuple[str, str]] = {
    "sim": ("companion.sim.cli", "run the PVE simulator (test double and demo)"),
    "build": ("companion.build_cli", "build a release's templates on the host, with progress"),
    "demo": ("companion.demo", "run the demo: simulator + companion (+ Home Assistant)"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrlable-companion",
        description="Ctrlable Provisioner companion: deploys Ctrlable appliance stacks on PVE.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the companion HTTP service")
    serve.add_argument("--env-file", type=Path, help="read settings from this file (env wins)")
    manifest = sub.add_parser("manifest", help="release manifest tools")
    msub = manifest.add_subparsers(dest="manifest_command", metavar="ACTION")
    check = msub.add_parser("check", help="validate manifest files")
    check.add_argument("files", nargs="+", type=Path)
    for name, (_module, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _serve(env_file: Path | None) -> int:
    try:
        settings = Settings.load(env_file=env_file)
    except (SettingsError, OSError) as err:
        print(f"ctrlable-companion: {err}", file=sys.stderr)
        return 2
    setup_logging(
        settings.log_level,
        [
            settings.api_token.get_secret_value(),
            settings.pve_token_secret.get_secret_value(),
            settings.firstboot_secret.get_secret_value(),
            settings.platform_token.get_secret_value(),
        ],
    )
    from .app import create_app

    web.run_app(
        create_app(settings),
        host=settings.listen_host,
        port=settings.listen_port,
        print=None,
        shutdown_timeout=10,
    )
    return 0


def _manifest_check(files: Sequence[Path]) -> int:
    status = 0
    for path in files:
        try:
            manifest = load_manifest(path)
        except ManifestError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 1
            continue
        print(f"{path}: ok")
        print(summary(manifest))
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[args_list[0]][0])
        delegate: Callable[[list[str]], int] = module.main
        return delegate(args_list[1:])
    parser = _parser()
    args = parser.parse_args(args_list)
    if args.command == "serve":
        return _serve(args.env_file)
    if args.command == "manifest" and args.manifest_command == "check":
        return _manifest_check(args.files)
    parser.print_help()
    return 0 if args.command is None else 2


def run() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    run()
