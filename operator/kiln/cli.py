"""The `kiln` command: the operator, runs and their logs, the AIB importer, local images."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _operator(args: argparse.Namespace) -> int:
    import asyncio

    import kiln.controller  # noqa: F401  (registers the handlers)
    from kiln.commands import serve
    from kiln.settings import load_settings

    settings = load_settings()
    serve.configure_logging(settings, args.verbose)
    return asyncio.run(serve.serve(settings))


def _crds(args: argparse.Namespace) -> int:
    from kiln.api.crd import write_crds
    from kiln.api.reference import write_reference

    for directory in args.out:
        for path in write_crds(Path(directory)):
            print(path)
    if args.reference:
        print(write_reference(Path(args.reference)))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from kiln.commands import logs

    operator = logs.OperatorService(namespace=args.operator_namespace, name=args.operator_service)
    try:
        logs.show(args.run, args.namespace, args.follow, operator, args.remote)
    except logs.LogsError as error:
        print(f"kiln logs: {error}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    from kiln.commands import run

    try:
        return run.run(args.template, args.namespace, args.wait, args.timeout)
    except run.RunError as error:
        print(f"kiln run: {error}", file=sys.stderr)
        return 1


def _import(args: argparse.Namespace) -> int:
    import yaml

    from kiln.commands import importer
    from kiln.commands.armtemplate import DeploymentScope
    from kiln.settings import load_settings

    settings = load_settings()
    scope = DeploymentScope(
        subscription_id=args.subscription_id,
        resource_group=args.resource_group,
        location=args.location,
    )
    defaults = DeploymentScope(
        subscription_id=settings.subscription_id,
        resource_group=settings.resource_group,
        location=settings.location,
    )
    try:
        document = importer.read_json(Path(args.file), sys.stdin)
        parameters = (
            importer.parameter_values(importer.read_json(Path(args.parameters)))
            if args.parameters
            else {}
        )
        imported = importer.import_document(
            document, parameters, args.name, args.namespace, scope, defaults
        )
    except importer.ImportProblem as error:
        for line in str(error).splitlines():
            print(f"kiln import: {line}", file=sys.stderr)
        return 1
    for one in imported:
        for note in one.notes:
            print(f"kiln import: {one.manifest['metadata']['name']}: {note}", file=sys.stderr)
    print(yaml.safe_dump_all([one.manifest for one in imported], sort_keys=False), end="")
    return 0


def _images(args: argparse.Namespace) -> int:
    from kiln.providers.local import baseimage
    from kiln.settings import load_settings

    cache = load_settings().cache_root
    build = baseimage.build_image if args.action == "build" else baseimage.ensure_image
    image = build(args.release, cache)
    print(
        f"{image.publisher}:{image.offer}:{','.join(image.skus)}:{image.version} {image.directory}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    operator = commands.add_parser(
        "operator", help="run the operator (settings from KILN_* environment variables)"
    )
    operator.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    operator.set_defaults(func=_operator)

    logs = commands.add_parser("logs", help="print a run's customization log")
    logs.add_argument("run", help="ImageBuildRun name")
    logs.add_argument("-n", "--namespace", default="default")
    logs.add_argument("-f", "--follow", action="store_true", help="follow while the run is active")
    logs.add_argument(
        "--operator-namespace",
        default=os.environ.get("KILN_OPERATOR_NAMESPACE", "kiln-system"),
        help="where Kiln is installed, when this is not the operator's machine "
        "(the log is read through the API server's proxy to the operator's Service)",
    )
    logs.add_argument(
        "--operator-service",
        default=os.environ.get("KILN_OPERATOR_SERVICE", "kiln"),
        help="the operator's Service (the Helm release name)",
    )
    logs.add_argument(
        "--remote",
        action="store_true",
        help="read through the API server even where the operator's files are at hand",
    )
    logs.set_defaults(func=_logs)

    runs = commands.add_parser("run", help="start a build of a template (an ImageBuildRun)")
    runs.add_argument("template", help="ImageTemplate name")
    runs.add_argument("-n", "--namespace", default="default")
    runs.add_argument("--wait", action="store_true", help="follow the run; exit 0 if it succeeds")
    runs.add_argument(
        "--timeout", type=float, default=300, help="minutes --wait waits at most (300)"
    )
    runs.set_defaults(func=_run)

    imports = commands.add_parser(
        "import",
        help="print an AIB image template (JSON: az image builder show, the resource, or an "
        "ARM template holding it, as written or as Bicep emits it) as ImageTemplate YAML",
    )
    imports.add_argument("file", help="the AIB template JSON (comments allowed); - for stdin")
    imports.add_argument("--parameters", help="ARM parameters file for an ARM template")
    imports.add_argument(
        "--subscription-id", help="subscription().subscriptionId (default: KILN_SUBSCRIPTION_ID)"
    )
    imports.add_argument(
        "--resource-group", help="resourceGroup().name (default: KILN_RESOURCE_GROUP)"
    )
    imports.add_argument("--location", help="resourceGroup().location (default: KILN_LOCATION)")
    imports.add_argument("--name", help="the ImageTemplate's name (default: the AIB name)")
    imports.add_argument("-n", "--namespace", help="put metadata.namespace in the manifest")
    imports.set_defaults(func=_import)

    images = commands.add_parser("images", help="local provider platform images")
    images.add_argument(
        "action",
        choices=["ensure", "build"],
        help="ensure: build the Debian image if none is cached; build: a new version "
        "(templates following 'latest' with a SourceImage trigger rebuild on it)",
    )
    images.add_argument(
        "--release",
        choices=["11", "12", "13"],
        default="12",
        help="Debian release: offer debian-N, SKUs N (Gen1, BIOS) and N-gen2 (Gen2, UEFI)",
    )
    images.set_defaults(func=_images)

    crds = commands.add_parser("crds", help="write the CRD YAML generated from the API models")
    crds.add_argument(
        "--out", nargs="+", default=["crds", "charts/kiln/crds"], help="directories to write to"
    )
    crds.add_argument(
        "--reference",
        default="docs/api-reference.md",
        help="the API reference generated from the CRDs ('' to skip)",
    )
    crds.set_defaults(func=_crds)

    return parser


def main(argv: list[str] | None = None) -> None:
    from kiln.settings import SettingsError

    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except SettingsError as error:
        print(f"kiln {args.command}: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
