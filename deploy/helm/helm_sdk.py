"""`helm lint` and `helm template` through the Helm SDK (PyPI helm-python-sdk, which binds
Helm's Go SDK with ctypes), for machines without a helm binary.

    python deploy/helm/helm_sdk.py lint --strict deploy/helm/meter
    python deploy/helm/helm_sdk.py template deploy/helm/meter --name meter --namespace meter [--values FILE]

`lint` prints each finding and exits 1 on an error (and on a warning with --strict);
`template` prints the rendered manifests as one YAML stream, like `helm template`.
"""

from __future__ import annotations

import argparse
import sys

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def main(argv: list[str] | None = None) -> int:
    import helm_python as helm

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    lint = sub.add_parser("lint")
    lint.add_argument("chart")
    lint.add_argument("--strict", action="store_true", help="fail on warnings too")
    lint.add_argument("--namespace", default="meter")
    template = sub.add_parser("template")
    template.add_argument("chart")
    template.add_argument("--name", default="meter")
    template.add_argument("--namespace", default="meter")
    template.add_argument("--values", metavar="FILE", help="a YAML or JSON file of values")
    args = parser.parse_args(argv)
    print(f"helm SDK {helm.helm_sdk_version()}", file=sys.stderr)
    if args.command == "lint":
        report = helm.lint(args.chart, strict=args.strict, namespace=args.namespace)
        worst = 0
        for message in report.get("messages") or []:
            severity = int(message.get("severity", 0))
            worst = max(worst, severity)
            print(f"[{SEVERITY.get(severity, severity)}] {message.get('path')}: {message.get('error')}")
        for error in report.get("errors") or []:
            worst = 3
            print(f"[ERROR] {error}")
        linted = report.get("total_charts_linted", 0)
        failed = worst >= 3 or (args.strict and worst >= 2) or not linted
        print(f"{linted} chart(s) linted, {'failed' if failed else 'no failures'}")
        return 1 if failed else 0
    values = None
    if args.values:
        with open(args.values) as handle:
            values = helm.values_from_yaml(handle.read())
    with helm.Chart.load(args.chart) as chart:
        manifests = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    for path in sorted(manifests):
        text = manifests[path].strip()
        if path.endswith("NOTES.txt") or not text:
            continue
        body = text.removeprefix("---").lstrip("\n")
        sys.stdout.write(f"---\n# Source: {path}\n{body}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
