#!/usr/bin/env bash
# Installs a Prometheus whose build has Consul service discovery into the project's environment.
#
# Debian disabled Consul SD in its prometheus package from 2.33.5+ds1-4 on (bookworm's 2.42 and
# trixie's 2.53 reject `consul_sd_configs`). Debian bullseye's prometheus 2.24.1 still has it: like
# Consul (scripts/install.sh), it is fetched with `apt-get download` through a private sources
# list that reuses this machine's Debian mirror, and unpacked with `dpkg -x` into BIN_DIR. The
# system's apt state stays untouched. A Prometheus with Consul SD already on PATH is used as is.
#
# Usage: deploy/prometheus/install.sh [BIN_DIR]     (default: .venv/bin of this checkout)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN_DIR=${1:-${VENV:-$ROOT/.venv}/bin}
CACHE=${ERNIE_MESH_CACHE:-$ROOT/.cache}
SUITE=bullseye

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'install-prometheus: %s\n' "$*" >&2; exit 1; }

# A promtool accepts consul_sd_configs only if its build (and its prometheus') has Consul SD.
has_consul_sd() {
  local promtool=$1 cfg
  [ -x "$promtool" ] || return 1
  cfg=$(mktemp --suffix=.yml)
  printf 'scrape_configs:\n  - job_name: probe\n    consul_sd_configs: [{server: "127.0.0.1:8500"}]\n' > "$cfg"
  "$promtool" check config "$cfg" >/dev/null 2>&1 && { rm -f "$cfg"; return 0; }
  rm -f "$cfg"; return 1
}

if has_consul_sd "$BIN_DIR/promtool" && [ -x "$BIN_DIR/prometheus" ]; then exit 0; fi
mkdir -p "$BIN_DIR"
if command -v prometheus >/dev/null 2>&1 && has_consul_sd "$(dirname "$(command -v prometheus)")/promtool"; then
  say "Prometheus: using $(command -v prometheus) (has Consul SD)"
  ln -sf "$(command -v prometheus)" "$BIN_DIR/prometheus"
  ln -sf "$(dirname "$(command -v prometheus)")/promtool" "$BIN_DIR/promtool"
  exit 0
fi

. "$ROOT/scripts/lib/debian.sh"
say "Prometheus with Consul SD (Debian $SUITE package, unpacked into $BIN_DIR; system apt state untouched)"
fetch_debian_binaries "$SUITE" prometheus "$CACHE/prometheus-apt" "$BIN_DIR" prometheus promtool \
  || die "install Prometheus (with Consul SD) from https://prometheus.io/download/ into $BIN_DIR"
has_consul_sd "$BIN_DIR/promtool" || die "the $SUITE prometheus package has no Consul SD either"
"$BIN_DIR/prometheus" --version 2>&1 | sed -n 1p >&2
