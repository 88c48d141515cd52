#!/usr/bin/env bash
# Builds the herdsman .deb with `dpkg-buildpackage -b -us -uc` and copies it to target/debian/;
# prints the path of the .deb, nothing else on success.
#
#   packaging/build-deb.sh [VERSION]        VERSION (or HERDSMAN_DEB_VERSION), e.g. 0.1.0-2:
#                                           build that version instead of debian/changelog's
#                                           (a temporary changelog entry; the checkout is
#                                           never modified)
#   HERDSMAN_DEB_CHECK=1                    also run the test suite during the build
#                                           (default: DEB_BUILD_OPTIONS=nocheck; CI builds
#                                           its .deb with the tests)
#   CARGO_NET_OFFLINE=true                  build without the network after `cargo fetch`
#
# The build runs on a copy of the checkout (tracked and untracked-but-not-ignored files) in
# target/debian-build/ (mode 0700, like a builder's private directory: the tests must pass
# there), so dpkg-buildpackage's files land there instead of in the parent directory, and the
# copy shares the checkout's target/ for cargo. Installs the missing Build-Depends of
# debian/control with `apt-get build-dep` (as root; the <!nocheck> ones only with
# HERDSMAN_DEB_CHECK=1), nothing else. Needs cargo >= 1.85 (rustup).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=${1:-${HERDSMAN_DEB_VERSION:-}}
work="$root/target/debian-build"
out="$root/target/debian"
log="$work/build.log"

die() {
  echo "build-deb: $*" >&2
  exit 1
}

# Runs a command with its output in $log; shows the end of it if the command fails.
quiet() {
  if ! "$@" >>"$log" 2>&1; then
    echo "build-deb: failed: $*" >&2
    tail -n 40 "$log" >&2
    die "full log: $log"
  fi
}

# One build at a time per checkout (they share $work).
mkdir -p "$root/target"
exec 9>"$root/target/.build-deb.lock"
flock 9

rm -rf "$work"
mkdir -p "$work" "$out"
chmod 0700 "$work"
: >"$log"

profiles=()
if [ "${HERDSMAN_DEB_CHECK:-0}" != 1 ]; then profiles=(-Pnocheck); fi

export CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
export PATH="$CARGO_HOME/bin:$PATH"
command -v cargo >/dev/null || die "cargo not found (install Rust with rustup; Debian's cargo is too old)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}

# Copy the sources (what git would see, including uncommitted work; everything but target/
# and .git outside a git checkout), keeping modification times so cargo's build stays fresh.
src="$work/herdsman"
mkdir -p "$src"
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$root" ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do
      # Tracked files deleted in the work tree are listed too: skip them.
      if [ -e "$root/$f" ] || [ -L "$root/$f" ]; then printf '%s\0' "$f"; fi
    done \
    | tar -C "$root" --null -T - -cf - | tar -C "$src" -xf -
else
  tar -C "$root" --exclude=./target --exclude=./.git -cf - . | tar -C "$src" -xf -
fi
[ -f "$src/debian/control" ] || die "no debian/ directory in $root"

# The declared build dependencies, and only those: what dpkg-buildpackage checks is what is
# installed (the test suite's tools are Build-Depends <!nocheck>).
if ! { command -v dpkg-checkbuilddeps >/dev/null && (cd "$src" && dpkg-checkbuilddeps "${profiles[@]}") >/dev/null 2>&1; }; then
  [ "$(id -u)" -eq 0 ] \
    || die "missing build dependencies: run \`apt-get build-dep ${profiles[*]} ./\` in the checkout as root (or run this as root)"
  export DEBIAN_FRONTEND=noninteractive
  quiet apt-get update -qq
  (cd "$src" && quiet apt-get build-dep -y -qq "${profiles[@]}" ./ 9>&-)
fi

# A newer (or any other) Debian version: a changelog entry on top, in the copy only.
if [ -n "$version" ]; then
  dpkg --validate-version "$version" 2>/dev/null || die "invalid Debian version: $version"
  case $version in *-*) ;; *) die "version $version has no Debian revision (like 0.1.0-2)" ;; esac
  changelog="$src/debian/changelog"
  current=$(dpkg-parsechangelog -l "$changelog" -S Version)
  if [ "$version" != "$current" ]; then
    dist=$(dpkg-parsechangelog -l "$changelog" -S Distribution)
    maint=$(dpkg-parsechangelog -l "$changelog" -S Maintainer)
    {
      printf 'herdsman (%s) %s; urgency=medium\n\n' "$version" "$dist"
      printf '  * Rebuild as %s (packaging/build-deb.sh).\n\n' "$version"
      printf ' -- %s  %s\n\n' "$maint" "$(LC_ALL=C date -R)"
      cat "$changelog"
    } >"$changelog.new"
    mv "$changelog.new" "$changelog"
  fi
fi

opts=${DEB_BUILD_OPTIONS:-}
if [ "${HERDSMAN_DEB_CHECK:-0}" != 1 ]; then opts="$opts nocheck"; fi
export DEB_BUILD_OPTIONS="${opts# } terse"

# (9>&-: the lock is ours; the build and its tests must not inherit it.)
(cd "$src" && quiet dpkg-buildpackage -b -us -uc "${profiles[@]}" 9>&-)

debs=("$work"/*.deb)
[ -e "${debs[0]}" ] || die "dpkg-buildpackage made no .deb (log: $log)"
for deb in "${debs[@]}"; do
  cp "$deb" "$out/"
  echo "$out/$(basename "$deb")"
done
# The build's log (with the test suite's results when it ran) stays beside the package.
cp "$log" "$out/build.log"
rm -rf "$work"
