#!/usr/bin/env bash
# The whole test suite, against the stack `pilothouse stack up` started: policy checks with the real OPA binary,
# then pytest (unit, integration, e2e). Any failure fails the run; pytest's exit code 5 (no tests collected) too.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"

opa_bin=$("$VENV/bin/python" -c 'from pilothouse.stack.config import Settings; from pilothouse.stack.opa import binary; print(binary(Settings()))')
if [[ ! -x "$opa_bin" ]]; then echo "OPA binary $opa_bin missing: run \`pilothouse stack up\`" >&2; exit 1; fi
echo "== opa fmt / check / test --coverage (policies/)"
unformatted=$("$opa_bin" fmt --list policies)
if [[ -n "$unformatted" ]]; then echo "opa fmt: not formatted: $unformatted" >&2; exit 1; fi
"$opa_bin" check --strict policies
"$opa_bin" test policies --coverage --format json > "${TMPDIR:-/tmp}/pilothouse-opa-coverage.json"
"$VENV/bin/python" - "${TMPDIR:-/tmp}/pilothouse-opa-coverage.json" <<'PY'
import json, sys
cov = json.load(open(sys.argv[1]))["coverage"]
print(f"opa test: all tests passed, coverage {cov:.1f}%")
sys.exit(0 if cov >= 90 else f"Rego coverage {cov:.1f}% is below 90%")
PY

echo "== pytest"
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit $rc
