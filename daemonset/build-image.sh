#!/usr/bin/env bash
# The agent's container image without a registry: the Dockerfile's `runtime` stage (FROM scratch)
# built by buildah from a root filesystem staged here from a binary built on this machine, in
# place of the Dockerfile's `build` stage (which needs the rust base image). The Dockerfile's build
# stage stages its own binary with `--rootfs`, so both ways give one layout:
#
#   /pod-identity-agent                       the binary (entrypoint)
#   <each library ldd lists, at that path>    libc, libm, libgcc_s and the loader for a glibc build
#   /etc/ssl/certs/ca-certificates.crt        trust for HTTPS to EKS Auth, STS and a token issuer
#   /etc/nsswitch.conf                        hosts: files, then DNS (glibc's default is the reverse)
#
# No /etc/passwd: the image names its user by number (USER 65532:65532; the DaemonSet runs
# UID 0), so nothing looks a user up.
#
# Usage:
#   daemonset/build-image.sh BINARY IMAGE     build IMAGE (needs buildah; prints size and time)
#   daemonset/build-image.sh --rootfs BINARY DIR
#                                             only stage the files into DIR (the Dockerfile)
set -euo pipefail

usage() {
  sed -n 's/^#   //p' "$0" >&2
  exit 2
}

# Stage BINARY and what it needs at run time into DIR.
stage() {
  local bin=$1 root=$2
  [ -f "$bin" ] || { echo "build-image: no binary at $bin (cargo build --release)" >&2; exit 1; }
  install -D -m 0755 "$bin" "$root/pod-identity-agent"
  # ldd prints `name => /path (addr)` per library, `/path (addr)` for the loader, no path for
  # the vDSO, and `not found` for what this machine lacks; a static binary has none (exit 1).
  local libs
  if libs=$(ldd "$bin" 2>&1); then
    if grep -q 'not found' <<<"$libs"; then
      echo "build-image: $bin links libraries this machine lacks:" >&2
      grep 'not found' <<<"$libs" >&2
      exit 1
    fi
    # Copied with symlinks resolved, to the path the loader will look at.
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$libs" |
      while read -r lib; do
        install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
      done
  fi
  local ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
  [ -s "$ca" ] || { echo "build-image: no CA bundle at $ca (install ca-certificates, or set CA_BUNDLE)" >&2; exit 1; }
  install -D -m 0644 "$ca" "$root/etc/ssl/certs/ca-certificates.crt"
  printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
  chmod 0644 "$root/etc/nsswitch.conf"
}

if [ "${1:-}" = "--rootfs" ]; then
  [ $# -eq 3 ] || usage
  stage "$2" "$3"
  exit 0
fi
[ $# -eq 2 ] || usage
bin=$1 image=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
command -v buildah >/dev/null || { echo "build-image: buildah not found (apt-get install buildah)" >&2; exit 1; }

start=$(date +%s.%N)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage "$bin" "$work/rootfs"
mkdir "$work/context"
# `--build-context build=DIR` stands in for the Dockerfile's build stage (its /rootfs is ours),
# so only the runtime stage runs: nothing is pulled, and nothing else is read.
buildah build --quiet --pull=never --target runtime \
  --build-context "build=$work" -f "$repo/Dockerfile" -t "$image" "$work/context" >/dev/null
end=$(date +%s.%N)

# The image's uncompressed size as podman reports it (shared storage with buildah); without
# podman, the staged files' total, which is within a few KB of it.
if command -v podman >/dev/null; then
  size=$(podman image inspect --format '{{.Size}}' "$image")
else
  size=$(du -sb "$work/rootfs" | cut -f1)
fi
awk -v i="$image" -v s="$size" -v a="$start" -v b="$end" \
  'BEGIN { printf "%s: %d bytes (%.1f MB) uncompressed, built in %.1f s\n", i, s, s / 1e6, b - a }'
