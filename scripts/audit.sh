#!/usr/bin/env bash
# Dependency audit: known vulnerabilities in what the image installs (requirements.lock) and in the installed environment.
#
#   ./scripts/audit.sh              audit both; fail on a known vulnerability that has a fixed version
#   PYTHON=.venv/bin/python ./scripts/audit.sh
#   AUDIT_SERVICE=osv ./scripts/audit.sh       ask osv.dev instead of PyPI's advisory data
#   AUDIT_ALLOW_UNREACHABLE=1 ./scripts/audit.sh   an unreachable advisory database is a warning, not a failure
#   AUDIT_SKIP_PROBE=1           go straight to pip-audit (the per-package results still tell what was checked)
#   AUDIT_IGNORE=a,b             packages that are not on PyPI on purpose (default: reranker, this project)
#
# Exit status: 0 nothing fixable found (unfixable advisories are listed as warnings); 1 a vulnerability with a fix
# was found (upgrade to the version named); 2 the audit could not run (pip-audit missing, resolution failed);
# 3 the advisory database could not be reached or some packages could not be looked up, so NOTHING was proven.
#
# Why 3 exists: pip-audit reports "No known vulnerabilities found" even when every lookup failed (each package is
# only "skipped"). This script never lets an audit that checked nothing pass as clean.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SERVICE=${AUDIT_SERVICE:-pypi}
REQUIREMENTS=${AUDIT_REQUIREMENTS:-requirements.lock}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say() { printf '%s\n' "$*" >&2; }

if ! "$PYTHON" -m pip_audit --version >/dev/null 2>&1; then
  say "audit: pip-audit is not installed for $PYTHON: pip install -e '.[dev]'"
  exit 2
fi

# 1. Can the advisory database answer at all? Ask it about a release with a published advisory (jinja2 2.4.1,
#    PYSEC-2014-8 among others): an answer without it means the source is unreachable or serves no advisories.
probe=ok
[ "${AUDIT_SKIP_PROBE:-}" = "1" ] || probe=$("$PYTHON" - "$SERVICE" <<'EOF'
import json, sys, urllib.request
service = sys.argv[1]
try:
    if service == "osv":
        request = urllib.request.Request(
            "https://api.osv.dev/v1/query",
            data=json.dumps({"package": {"name": "jinja2", "ecosystem": "PyPI"}, "version": "2.4.1"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        found = json.load(urllib.request.urlopen(request, timeout=20)).get("vulns", [])
    else:
        url = "https://pypi.org/pypi/jinja2/2.4.1/json"
        found = json.load(urllib.request.urlopen(url, timeout=20)).get("vulnerabilities", [])
    print("ok" if found else "empty: the known advisories of jinja2 2.4.1 were not returned")
except Exception as error:  # noqa: BLE001 - any failure means the same thing here
    print(f"unreachable: {type(error).__name__}: {error}")
EOF
)
if [ "$probe" != "ok" ]; then
  if [ "$SERVICE" = "osv" ]; then source_name="osv.dev (api.osv.dev/v1/query)"; else
    source_name="PyPI's advisory data (pypi.org/pypi/<name>/<version>/json)"; fi
  say "audit: the vulnerability database is not usable from this machine: $source_name -> $probe"
  say "audit: NO AUDIT WAS PERFORMED. Run it where $source_name is reachable, or try AUDIT_SERVICE=$([ "$SERVICE" = osv ] && echo pypi || echo osv)."
  if [ "${AUDIT_ALLOW_UNREACHABLE:-}" = "1" ]; then
    say "audit: AUDIT_ALLOW_UNREACHABLE=1: not failing"
    exit 0
  fi
  exit 3
fi

# 2. What the image installs (requirements.lock: exact versions), then everything installed in $PYTHON's
#    environment (torch included, which the lock leaves out).
status=0
"$PYTHON" -m pip_audit --vulnerability-service "$SERVICE" --progress-spinner off --format json \
  --requirement "$REQUIREMENTS" --output "$work/requirements.json" 2>"$work/requirements.err" || true
"$PYTHON" -m pip_audit --vulnerability-service "$SERVICE" --progress-spinner off --format json \
  --local --output "$work/environment.json" 2>"$work/environment.err" || true
for part in requirements environment; do
  if [ ! -s "$work/$part.json" ]; then
    say "audit: pip-audit failed on the $part:"
    cat "$work/$part.err" >&2
    exit 2
  fi
done

AUDIT_IGNORE=${AUDIT_IGNORE:-reranker} \
"$PYTHON" - "$work/requirements.json" "$work/environment.json" "$REQUIREMENTS" <<'EOF' || status=$?
import json, os, sys

ignored = {name.strip().lower() for name in os.environ["AUDIT_IGNORE"].split(",") if name.strip()}

labels = {sys.argv[1]: f"{sys.argv[3]} (resolved)", sys.argv[2]: "installed environment"}
fixable, unfixable, skipped, audited = [], [], [], 0
for path, label in labels.items():
    for dependency in json.load(open(path))["dependencies"]:
        name, version = dependency["name"], dependency.get("version", "?")
        if name.lower() in ignored:
            continue
        if "skip_reason" in dependency:
            skipped.append(f"{label}: {name}: {dependency['skip_reason']}")
            continue
        audited += 1
        for vulnerability in dependency.get("vulns", []):
            ids = ", ".join([vulnerability["id"], *vulnerability.get("aliases", [])])
            fixes = vulnerability.get("fix_versions") or []
            line = f"{label}: {name} {version}: {ids}"
            if fixes:
                fixable.append(f"{line} -> fixed in {', '.join(fixes)}")
            else:
                unfixable.append(f"{line} (no fixed version yet)")

print(f"audit: {audited} package versions checked, {len(skipped)} could not be looked up")
for line in unfixable:
    print(f"WARNING {line}")
for line in fixable:
    print(f"VULNERABLE {line}")
if fixable:
    print(f"audit: {len(fixable)} known vulnerabilities have a fix: upgrade")
    sys.exit(1)
if skipped:
    for line in skipped[:20]:
        print(f"NOT CHECKED {line}")
    if len(skipped) > 20:
        print(f"NOT CHECKED ... and {len(skipped) - 20} more")
    print("audit: some packages could not be looked up in the advisory database: the audit is INCOMPLETE")
    sys.exit(3)
print("audit: no known vulnerability with a fix")
EOF
if [ "$status" = "3" ] && [ "${AUDIT_ALLOW_UNREACHABLE:-}" = "1" ]; then
  say "audit: AUDIT_ALLOW_UNREACHABLE=1: an incomplete audit is not failing"
  exit 0
fi
exit "$status"
