#!/bin/sh
# Install the services the tests start themselves, each only when missing: redis-server,
# redis-cli (redis-tools) and redis-sentinel from Debian bookworm; valkey-server from
# bookworm-backports, whose suite is added once (its own file, with the mirror URI and Signed-By
# of the bookworm entry). The Firestore emulator ships with the Google Cloud CLI.
# Quiet on success; apt's output is shown only when an install fails. Root, or sudo.
set -eu

DEBIAN_SOURCES=/etc/apt/sources.list.d/debian.sources
BACKPORTS_SOURCES=/etc/apt/sources.list.d/bookworm-backports.sources
BINARIES="redis-server redis-cli redis-sentinel valkey-server"

missing=""
command -v redis-server >/dev/null || missing="$missing redis-server"
command -v redis-cli >/dev/null || missing="$missing redis-tools"
command -v redis-sentinel >/dev/null || missing="$missing redis-sentinel"

if [ -n "$missing" ] || ! command -v valkey-server >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq -o=Dpkg::Use-Pty=0"
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  install() {
    $APT install -y "$@" >"$log" 2>&1 || {
      cat "$log" >&2
      echo "install-services: apt-get could not install $*" >&2
      exit 1
    }
  }
  if ! command -v valkey-server >/dev/null \
    && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    entry=$(awk 'BEGIN { RS = ""; FS = "\n" } {
      uri = ""; key = ""; ours = 0
      for (i = 1; i <= NF; i++) {
        if ($i ~ /^URIs:/) { split($i, w, /[ \t]+/); uri = w[2] }
        if ($i ~ /^Signed-By:/) { split($i, w, /[ \t]+/); key = w[2] }
        if ($i ~ /^Suites:/) { n = split($i, w, /[ \t]+/); for (j = 2; j <= n; j++) if (w[j] == "bookworm") ours = 1 }
      }
      if (ours && uri != "") { print uri, key; exit } }' "$DEBIAN_SOURCES" 2>/dev/null || true)
    [ -n "$entry" ] || {
      echo "install-services: no bookworm entry in $DEBIAN_SOURCES to add bookworm-backports to" >&2
      exit 1
    }
    set -- $entry
    {
      printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\n' "$1"
      [ -z "${2:-}" ] || printf 'Signed-By: %s\n' "$2"
    } | $SUDO tee "$BACKPORTS_SOURCES" >/dev/null
  fi
  $APT update
  # shellcheck disable=SC2086 # a list of package names
  [ -z "$missing" ] || install $missing
  command -v valkey-server >/dev/null || install -t bookworm-backports valkey-server
fi

for binary in $BINARIES; do
  command -v "$binary" >/dev/null || {
    echo "install-services: $binary is not installed" >&2
    exit 1
  }
done
