# Sourced by install scripts: take binaries out of a package of another Debian suite without
# touching the system's apt state (docs/architecture.md §5.1).

debian_mirror() {
  # The Debian mirror this machine already uses (deb822 or one-line sources), not a hard-coded one.
  local uri
  uri=$(grep -hsE '^URIs:.*debian' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | awk 'NR == 1 {print $2}')
  [ -n "$uri" ] || uri=$(grep -hsE '^deb .*debian' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -v security | awk 'NR == 1 {print $2}')
  [ -n "$uri" ] || uri=http://deb.debian.org/debian
  echo "$uri"
}

# fetch_debian_binaries SUITE PACKAGE WORK_DIR BIN_DIR BINARY...
# apt-get download through a private sources list (suite SUITE of this machine's mirror), dpkg -x,
# then install /usr/bin/BINARY... into BIN_DIR.
fetch_debian_binaries() {
  local suite=$1 pkg=$2 d=$3 bin_dir=$4; shift 4
  command -v apt-get >/dev/null || { echo "no apt-get to fetch $pkg from Debian $suite" >&2; return 1; }
  rm -rf "$d"; mkdir -p "$d/lists/partial" "$d/archives/partial" "$d/x" "$bin_dir"
  echo "deb $(debian_mirror) $suite main" > "$d/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$d/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
              -o "Dir::State::Lists=$d/lists" -o "Dir::Cache::Archives=$d/archives" -o "APT::Sandbox::User=root")
  apt-get "${opts[@]}" -qq update
  # The version in that suite, named explicitly: an installed newer package would otherwise win.
  local ver
  ver=$(apt-cache "${opts[@]}" madison "$pkg" | awk -F'|' 'NR==1 {gsub(/ /, "", $2); print $2}')
  [ -n "$ver" ] || { echo "no $pkg package in Debian $suite" >&2; return 1; }
  (cd "$d" && apt-get "${opts[@]}" -qq download "$pkg=$ver")
  dpkg -x "$d/${pkg}_"*.deb "$d/x"
  local b
  for b in "$@"; do install -m 0755 "$d/x/usr/bin/$b" "$bin_dir/$b"; done
}
