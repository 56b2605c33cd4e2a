"""`python -m kiln_devtools`: the local control plane and the demo, for the Makefile."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln_devtools import demo, localcluster


def _cluster(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if args.action == "up":
        kubeconfig = localcluster.up(state_dir, crds_dir=Path(args.crds))
        version = localcluster.kubernetes_version()
        print(f"control plane (Kubernetes {version}) ready; KUBECONFIG={kubeconfig}")
        print(f"kubectl of that release: {localcluster.binary(localcluster.KUBECTL)}")
    elif args.action == "down":
        localcluster.down(state_dir)
        print("control plane stopped")
    else:
        print(localcluster.status(state_dir))
    return 0


def _demo(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if args.action == "stop":
        demo.stop_operator(state_dir)
        return 0
    return demo.run_demo(state_dir, Path(args.examples))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kiln_devtools", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    cluster = commands.add_parser(
        "cluster", help="a local control plane (etcd, kube-apiserver, controller manager)"
    )
    cluster.add_argument("action", choices=["up", "down", "status"])
    cluster.add_argument(
        "--state-dir", default=".kiln", help="where pids, certs and kubeconfig live"
    )
    cluster.add_argument("--crds", default="crds", help="CRD YAML to install after start")
    cluster.set_defaults(func=_cluster)

    demos = commands.add_parser("demo", help="build examples/ on this machine (make demo)")
    demos.add_argument("action", choices=["run", "stop"])
    demos.add_argument("--state-dir", default=".kiln")
    demos.add_argument("--examples", default="examples")
    demos.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
