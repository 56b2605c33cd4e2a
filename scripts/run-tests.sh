#!/usr/bin/env bash
# The whole test suite: lint, unit, integration (real kube-apiserver) and e2e (real VMs).
# Extra arguments go to pytest (e.g. -m "not e2e"). No test collected is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."

.venv/bin/ruff check operator devtools tests bench || exit 1
.venv/bin/ruff format --check operator devtools tests bench || exit 1
bash scripts/setup-bench.sh >/dev/null || exit 1  # the bench's smoke test runs Packer

# Without arguments (make test): everything but the long whole-build tests marked slow,
# which `make e2e-slow` runs, and the full chaos suite (`make chaos`); CI has 90 minutes.
[ "$#" -gt 0 ] || set -- -m "not slow and not chaos"
.venv/bin/pytest -p no:cacheprovider -ra --durations=25 "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "run-tests: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$status"
