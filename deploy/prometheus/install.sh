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

debian_mirror() {
  local uri
  uri=$(grep -hsE '^URIs:.*debian' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 | awk '{print $2}')
  [ -n "$uri" ] || uri=$(grep -hsE '^deb .*debian' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -v security | head -n1 | awk '{print $2}')
  [ -n "$uri" ] || uri=http://deb.debian.org/debian
  echo "$uri"
}

command -v apt-get >/dev/null || die "no apt-get: install Prometheus (with Consul SD) from https://prometheus.io/download/ into $BIN_DIR"
say "Prometheus with Consul SD (Debian $SUITE package, unpacked into $BIN_DIR; system apt state untouched)"
d="$CACHE/prometheus-apt"
rm -rf "$d"; mkdir -p "$d/lists/partial" "$d/archives/partial" "$d/x"
echo "deb $(debian_mirror) $SUITE main" > "$d/sources.list"
opts=(-o "Dir::Etc::SourceList=$d/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State::Lists=$d/lists" -o "Dir::Cache::Archives=$d/archives" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" -qq update
# The version in that suite, named explicitly: an installed newer prometheus would otherwise win.
ver=$(apt-cache "${opts[@]}" madison prometheus | awk -F'|' 'NR==1 {gsub(/ /, "", $2); print $2}')
[ -n "$ver" ] || die "no prometheus package in Debian $SUITE"
(cd "$d" && apt-get "${opts[@]}" -qq download "prometheus=$ver")
dpkg -x "$d"/prometheus_*.deb "$d/x"
install -m 0755 "$d/x/usr/bin/prometheus" "$BIN_DIR/prometheus"
install -m 0755 "$d/x/usr/bin/promtool" "$BIN_DIR/promtool"
has_consul_sd "$BIN_DIR/promtool" || die "the $SUITE prometheus package has no Consul SD either"
"$BIN_DIR/prometheus" --version 2>&1 | head -n1 >&2
