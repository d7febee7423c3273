#!/usr/bin/env bash
# netbootd set-up on Debian 12 (as root). One command each:
#   ./setup.sh serve   install everything needed, build the demo image, run the daemon
#   ./setup.sh test    install everything needed, run the whole test suite (what CI runs)
#   ./setup.sh install only install (apt packages, .venv, demo image)
# Idempotent: a second run skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"
REPO=$PWD
VENV=$REPO/.venv
MODE=${1:-serve}
shift || true

# Runtime: Python, iPXE binaries for PXE clients, busybox + kernel tools for the demo image;
# gcc + python3-dev build the TFTP block loop in C (netbootd/tftp/_pump.c).
APT_RUNTIME=(python3 python3-venv python3-pip ipxe busybox-static cpio iproute2 ca-certificates
             gcc libc6-dev python3-dev)
# Tests: real peers (lab.md): site DHCP server, QEMU + firmware, NFS server/client, TFTP
# clients and servers, nginx (benchmarks), podman (container smoke test), chromium (status page).
APT_TEST=(qemu-system-x86 ipxe-qemu ovmf dnsmasq-base tcpdump tftp-hpa atftp tftpd-hpa
          nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils curl nginx-light
          podman buildah debootstrap runc chromium udhcpc)

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
  if [ -f "$stamp" ]; then
    local have
    have="$(cat "$stamp")"
    # the same install, or one with the test extras when only the daemon is wanted
    if [ "$have" = "$want" ] || { [ -z "$extras" ] && [ "${have%%\[*}" = "$sum" ]; }; then
      return 0
    fi
  fi
  log "pip install -e .$extras"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".$extras"
  echo "$want" > "$stamp"
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
  if [ -z "$(ls -A images/store/pi-demo 2>/dev/null)" ] && ! compgen -G "images/incoming/pi-demo-*" >/dev/null; then
    log "building the Raspberry Pi 5 demo boot tree"
    "$VENV/bin/python" images/build_image.py --pi --name pi-demo --incoming images/incoming \
      || log "Pi demo build failed: the daemon still runs; see images/README.md"
  fi
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
    exec "$VENV/bin/netbootd" serve "$@"
    ;;
  test)
    need_root
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
    echo "usage: $0 serve|test|install [args...]" >&2
    exit 2
    ;;
esac
