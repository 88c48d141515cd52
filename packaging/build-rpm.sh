#!/usr/bin/env bash
# Builds the herdsman binary RPM with rpmbuild (Debian's `rpm` package is enough) from the
# release binary, and copies it to target/rpm/; prints the path of the .rpm, nothing else on
# success.
#
#   packaging/build-rpm.sh
#   HERDSMAN_RPM_RELEASE=2          RPM release (default 1)
#   HERDSMAN_RPM_PACKAGER='Name <mail>'  the Packager tag (%packager; a build-system setting,
#                                   not the spec's)
#   HERDSMAN_BIN=/path/to/herdsman  package this binary instead of running
#                                   `cargo build --release --locked` (target/release/herdsman)
#
# The version is the binary's own (`herdsman --version`, i.e. Cargo.toml's). The spec,
# packaging/rpm/herdsman.spec, repackages what is built here: see its header. Installs the
# `rpm` package with apt when rpmbuild is missing (as root).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work="$root/target/rpm-build"
out="$root/target/rpm"
log="$work/build.log"
release=${HERDSMAN_RPM_RELEASE:-1}
packager=${HERDSMAN_RPM_PACKAGER:-herdsman developers <herdsman@example.org>}

die() {
  echo "build-rpm: $*" >&2
  exit 1
}

# Runs a command with its output in $log; shows the end of it if the command fails.
quiet() {
  if ! "$@" >>"$log" 2>&1; then
    echo "build-rpm: failed: $*" >&2
    tail -n 40 "$log" >&2
    die "full log: $log"
  fi
}

# One build at a time per checkout (they share $work).
mkdir -p "$root/target"
exec 9>"$root/target/.build-rpm.lock"
flock 9

rm -rf "$work"
mkdir -p "$work"/{SOURCES,stage} "$out"
: >"$log"

case $release in
  '' | *[!0-9A-Za-z._+~]*) die "invalid HERDSMAN_RPM_RELEASE: $release" ;;
esac

if ! command -v rpmbuild >/dev/null; then
  [ "$(id -u)" -eq 0 ] || die "rpmbuild missing: install the rpm package (or run as root)"
  export DEBIAN_FRONTEND=noninteractive
  quiet apt-get update -qq
  quiet apt-get install -y -qq --no-install-recommends rpm
fi

if [ -n "${HERDSMAN_BIN:-}" ]; then
  bin=$HERDSMAN_BIN
else
  export CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
  export PATH="$CARGO_HOME/bin:$PATH"
  command -v cargo >/dev/null || die "cargo not found (install Rust with rustup; Debian's cargo is too old)"
  (cd "$root" && quiet cargo build --release --locked)
  bin="${CARGO_TARGET_DIR:-$root/target}/release/herdsman"
fi
[ -x "$bin" ] || die "no executable at $bin"
version=$("$bin" --version | awk '{ print $2 }')
[ -n "$version" ] || die "could not read the version from '$bin --version'"

# Source0: everything the spec installs, prebuilt.
stage="$work/stage/herdsman-$version"
mkdir -p "$stage/units" "$stage/examples"
install -m 0755 "$bin" "$stage/herdsman"
quiet "$bin" generate "$stage"
cp "$root/units/herdsman@.service" "$root/units/herdsman@.socket" "$stage/units/"
cp "$root/examples/herdsman.toml" "$stage/examples/"
cp "$root/README.md" "$stage/"
tar -C "$work/stage" -czf "$work/SOURCES/herdsman-$version-prebuilt.tar.gz" "herdsman-$version"
cp "$root/packaging/rpm/macros.systemd-fallback" "$work/SOURCES/"

quiet rpmbuild -bb \
  --define "_topdir $work" \
  --define "herdsman_version $version" \
  --define "herdsman_release $release" \
  --define "packager $packager" \
  "$root/packaging/rpm/herdsman.spec"

rpms=("$work"/RPMS/*/herdsman-"$version"-"$release"*.rpm)
[ -e "${rpms[0]}" ] || die "rpmbuild made no .rpm (log: $log)"
for rpm in "${rpms[@]}"; do
  cp "$rpm" "$out/"
  echo "$out/$(basename "$rpm")"
done
rm -rf "$work"
