#!/usr/bin/env bash
# Build a real kube-apiserver (v1.20.2, Debian's source) and make sure etcd is installed, for the
# kubernetes backend's integration tests. No cluster, registry or release download is reachable on the
# machines bottle is tested on; Debian's repositories are. The binary is cached, so only a fresh machine
# pays the build (about 7 minutes on 2 cores).
#
# Prints the path of the binary on its last line.
set -euo pipefail

version=1.20.5+really1.20.2-1.1+deb12u1
cache="${BOTTLE_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bottle-test/kube-apiserver-$version}"
binary="$cache/kube-apiserver"

need=()
[ -x /usr/lib/go-1.19/bin/go ] || need+=(golang-1.19-go)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v dpkg-source >/dev/null 2>&1 || need+=(dpkg-dev)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v rsync >/dev/null 2>&1 || need+=(rsync)  # the build copies its tools with it
if [ -x "$binary" ]; then
    need=("${need[@]/golang-1.19-go}")
    need=("${need[@]/dpkg-dev}")
    need=("${need[@]/rsync}")
fi
need=($(printf '%s\n' "${need[@]}" | grep . || true))
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "kube-apiserver.sh: install ${need[*]} (as root) first" >&2
        exit 1
    fi
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x "$binary" ]; then
    src_list=/etc/apt/sources.list.d/bottle-test-deb-src.sources
    if ! apt-get source --print-uris "kubernetes=$version" >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || { echo "kube-apiserver.sh: add deb-src entries for bookworm (as root)" >&2; exit 1; }
        cat > "$src_list" <<SOURCES
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
        apt-get update -qq >&2
    fi
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (
        cd "$work"
        apt-get source -qq "kubernetes=$version" >&2
        cd kubernetes-*/
        PATH=/usr/lib/go-1.19/bin:$PATH GOPROXY=off GOFLAGS= CGO_ENABLED=0 GOCACHE="$work/gocache" \
            make WHAT=cmd/kube-apiserver >&2
        mkdir -p "$cache"
        install -m 0755 _output/bin/kube-apiserver "$binary.tmp"
        mv "$binary.tmp" "$binary"
    )
fi
echo "$binary"
