#!/usr/bin/env bash
# Stage 1 of ./run-tests: every test that runs on the host kernel.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.venv/bin/python -m pytest --ignore=tests/kernel -p no:cacheprovider "$@"
rc=$?
if [[ $rc == 5 ]]; then echo "test-host: pytest collected no tests" >&2; exit 1; fi
exit $rc
