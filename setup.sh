#!/usr/bin/env bash
# netbootd set-up on Debian 12 (as root). One command each:
#   ./setup.sh serve   install everything needed, build the demo image, run the daemon
#   ./setup.sh test    install everything needed, run the whole test suite (what CI runs)
#   ./setup.sh install only install (apt packages, .venv, demo images)
#   ./setup.sh container  build the appliance image with podman, offline (no registry)
# Idempotent: a second run skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"
REPO=$PWD
VENV=$REPO/.venv
MODE=${1:-serve}
shift || true

# Runtime: Python, iPXE binaries for PXE clients, busybox + kernel tools for the demo image;
# gcc + python3-dev build the TFTP block loop in C (netbootd/tftp/_pump.c).
# mtools + e2fsprogs + fdisk: `netbootd images import` takes Raspberry Pi OS images apart.
APT_RUNTIME=(python3 python3-venv python3-pip ipxe busybox-static cpio iproute2 ca-certificates
             gcc libc6-dev python3-dev mtools e2fsprogs xz-utils)
# Tests: real peers (lab.md): site DHCP server, QEMU + firmware, NFS server/client, TFTP
# clients and servers, nginx (benchmarks), podman (container smoke test), chromium (status page),
# etcd (replicas sharing state: their own members on loopback, never the packaged service),
# and what builds the provisioning images without loop devices (mkfs/mtools/syslinux/sfdisk).
APT_TEST=(qemu-system-x86 ipxe-qemu ovmf dnsmasq-base tcpdump tftp-hpa atftp tftpd-hpa
          nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils curl nginx-light
          podman buildah debootstrap runc chromium udhcpc
          dosfstools mtools syslinux syslinux-common fdisk kmod zstd openssl xz-utils e2fsprogs
          systemd util-linux etcd-server etcd-client
          qemu-system-arm u-boot-qemu qemu-efi-aarch64 grub-common)
# The container build (./setup.sh container).
APT_CONTAINER=(podman buildah debootstrap runc)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs Debian packages; the daemon binds ports 67/69)" >&2
    exit 1
  fi
}

apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  # Packages such as dnsmasq, rpcbind, ganesha and tftpd-hpa start services on install
  # (lab.md pitfall 10): forbid that while installing, restore afterwards.
  local guard=/usr/sbin/policy-rc.d
  local had_guard=0
  [ -e "$guard" ] && had_guard=1
  [ $had_guard = 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$guard"; chmod +x "$guard"; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || { [ $had_guard = 1 ] || rm -f "$guard"; return 1; }
  [ $had_guard = 1 ] || rm -f "$guard"
}

venv_install() {
  local extras=$1
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  # Skip pip when this exact pyproject + extras is installed already (a second
  # `./setup.sh serve` starts at once, and works without network).
  local stamp="$VENV/.netbootd-installed" want
  local sum
  # the C extension is built at install: a changed source means a new install
  sum="$(cat pyproject.toml setup.py netbootd/tftp/_pump.c | sha256sum | cut -d' ' -f1)"
  want="$sum$extras"
  local have=""
  [ -f "$stamp" ] && have="$(cat "$stamp")"
  # the same install, or one with the test extras when only the daemon is wanted
  if ! { [ "$have" = "$want" ] || { [ -z "$extras" ] && [ "${have%%\[*}" = "$sum" ]; }; }; then
    log "pip install -e .$extras"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e ".$extras"
    echo "$want" > "$stamp"
  fi
  # An editable install leaves the modules uncompiled: compile what changed now, so no
  # start pays for it (it would every time where PYTHONDONTWRITEBYTECODE is set).
  "$VENV/bin/python" -m compileall -q netbootd >/dev/null || true
}

demo_image() {
  # The embedded demo images, built from Debian packages by images/build_image.py and dropped
  # into images/incoming/, where the running daemon ingests and activates them:
  #   demo     kernel + initrd + NFS rootfs, boots x86 machines (and the lab's QEMU guests);
  #   pi-demo  a synthetic Raspberry Pi 5 boot tree (the real file names and sizes; it does
  #            not boot a real Pi: import Raspberry Pi OS for that, see README.md).
  [ -f images/build_image.py ] || return 0
  if [ -z "$(ls -A images/store/demo 2>/dev/null)" ] && ! compgen -G "images/incoming/demo-*" >/dev/null; then
    log "building the demo image (Debian cloud kernel + busybox initrd)"
    "$VENV/bin/python" images/build_image.py --name demo --incoming images/incoming \
      || log "demo image build failed: the daemon still runs; see images/README.md"
  fi
  # arm64 UEFI machines get GRUB (Debian has no arm64 iPXE): made from Debian's arm64 GRUB
  # modules with grub-mkimage (grub-common) when both are at hand; optional otherwise.
  if [ -f images/build_grub.py ] && [ ! -f images/grub/grubnetaa64.efi ] && command -v grub-mkimage >/dev/null \
     && dpkg --print-foreign-architectures | grep -qx arm64; then
    log "building the GRUB network image for arm64 UEFI machines"
    "$VENV/bin/python" images/build_grub.py || log "GRUB image build failed: arm64 UEFI clients get no reply"
  fi
  if [ -z "$(ls -A images/store/pi-demo 2>/dev/null)" ] && ! compgen -G "images/incoming/pi-demo-*" >/dev/null; then
    log "building the Raspberry Pi 5 demo boot tree"
    "$VENV/bin/python" images/build_image.py --pi --name pi-demo --incoming images/incoming \
      || log "Pi demo build failed: the daemon still runs; see images/README.md"
  fi
}

debian_mirror() {
  local src=/etc/apt/sources.list.d/debian.sources
  if [ -f "$src" ] && grep -q '^URIs:' "$src"; then
    grep -m1 '^URIs:' "$src" | awk '{print $2}'
  else
    echo "http://deb.debian.org/debian"
  fi
}

container_image() {
  # The appliance image, without a registry: the debian:bookworm-slim base is made here
  # from Debian packages (debootstrap), tagged locally, and the build never pulls.
  # PODMAN_ARGS: extra global podman options (the test uses its own --root/--runroot).
  # NETBOOTD_BASE_CACHE: where the base tarball is kept (one file, ~90 MB, reused).
  local tag=${NETBOOTD_IMAGE_TAG:-localhost/netbootd:latest}
  local cache=${NETBOOTD_BASE_CACHE:-/var/tmp/netbootd-test-cache}
  local tar=$cache/debian-bookworm-minbase.tar
  # shellcheck disable=SC2206
  local podman=(podman ${PODMAN_ARGS:-} --runtime runc)
  if [ ! -f "$tar" ]; then
    log "making the Debian bookworm base with debootstrap (once; cached in $cache)"
    mkdir -p "$cache"
    local root
    root=$(mktemp -d "$cache/rootfs-XXXXXX")
    debootstrap --variant=minbase bookworm "$root" "$(debian_mirror)" >/dev/null
    # what the official slim image leaves out: docs, man pages, locales, package caches
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb \
      "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/* \
      "$root"/usr/share/info/* "$root"/usr/share/locale/*
    mkdir -p "$root/var/lib/apt/lists/partial"
    printf 'path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\npath-exclude /usr/share/info/*\n' \
      > "$root/etc/dpkg/dpkg.cfg.d/slim"
    echo "deb $(debian_mirror) bookworm main" > "$root/etc/apt/sources.list"
    tar --numeric-owner --xattrs --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
      -C "$root" -cf "$tar.partial" .
    mv "$tar.partial" "$tar"
    rm -rf "$root"
  fi
  if ! "${podman[@]}" image exists docker.io/library/debian:bookworm-slim; then
    log "importing the base as debian:bookworm-slim"
    "${podman[@]}" import --change 'CMD ["/bin/bash"]' - docker.io/library/debian:bookworm-slim < "$tar" >/dev/null
  fi
  local build=(build --network=host --pull=never --format docker -t "$tag" -f Containerfile)
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    build+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt)
  fi
  for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL HTTPS_PROXY HTTP_PROXY; do
    if [ -n "${!v:-}" ]; then build+=(--build-arg "$v=${!v}"); fi
  done
  log "podman build $tag"
  "${podman[@]}" "${build[@]}" . >&2
  local size
  size=$("${podman[@]}" image inspect --format '{{.Size}}' "$tag")
  log "built $tag ($((size / 1000000)) MB). Run it (README: Running as a container):"
  echo "podman run -d --name netbootd --network=host --runtime runc --cap-add NET_BIND_SERVICE,NET_RAW,NET_ADMIN --ulimit nofile=16384:16384 --ulimit nproc=4096:4096 -v ./config:/etc/netbootd:ro -v netbootd-data:/var/lib/netbootd $tag" >&2
}

case "$MODE" in
  install)
    need_root
    apt_install "${APT_RUNTIME[@]}"
    venv_install ""
    demo_image
    ;;
  serve)
    need_root
    apt_install "${APT_RUNTIME[@]}"
    venv_install ""
    demo_image
    log "starting netbootd (config/netbootd.yaml); status page on http://<this host>:8080/"
    log "it runs in the foreground until Ctrl-C; in another terminal: .venv/bin/netbootd plan d8:3a:dd:12:34:56 --serial a1b2c3d4"
    exec "$VENV/bin/netbootd" serve "$@"
    ;;
  container)
    need_root
    apt_install "${APT_CONTAINER[@]}"
    container_image
    ;;
  test)
    need_root
    log "the full suite: ~1.4 GB of Debian packages on a fresh machine, a 220 MB .venv; see README 'Quick start' for time and caches"
    # The arm64 test image is made of Debian's arm64 packages (apt-get download, never
    # installed): arm64 must be a known foreign architecture before the lists are fetched.
    dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
    # Fresh package lists first (CI starts from a clean machine); a mirror hiccup is not
    # fatal when every package is already installed.
    apt-get update -qq || log "apt-get update failed; continuing with the existing lists"
    apt_install "${APT_RUNTIME[@]}" "${APT_TEST[@]}"
    venv_install "[test]"
    log "ruff check"
    "$VENV/bin/ruff" check netbootd tests bench images
    log "running the test suite"
    set +e
    "$VENV/bin/python" -m pytest "$@"
    rc=$?
    set -e
    if [ $rc = 5 ]; then
      echo "setup.sh: pytest collected no tests: that is a failure" >&2
      exit 1
    fi
    exit $rc
    ;;
  *)
    echo "usage: $0 serve|test|install|container [args...]" >&2
    exit 2
    ;;
esac
