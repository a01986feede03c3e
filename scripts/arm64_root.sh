#!/usr/bin/env bash
# An emulated 64-bit Raspberry Pi OS userland (Debian bookworm arm64, Python 3.11) for the agent's
# tests: built once with debootstrap + qemu-user-static into a cache directory OUTSIDE the checkout,
# reused afterwards (a stamp file records the recipe). See docs/arm64.md.
#
#   scripts/arm64_root.sh [prepare]   build the root if it is missing or stale (idempotent, ~5 min once)
#   scripts/arm64_root.sh status      say whether the root is ready (exit 0) or not (exit 1)
#   scripts/arm64_root.sh run CMD...  run CMD inside the root (proc/sys/dev mounted, unmounted on exit)
#   scripts/arm64_root.sh clean       remove the root
#
# Exit codes of `prepare`: 0 ready; 3 this machine cannot prepare it (not root, no binfmt_misc, the
# Debian mirror unreachable, tools missing): the reason is the LAST line printed, one line,
# starting "arm64 root unavailable:"; anything else is a real failure (the log says where).
#
# Environment: EDGEFLEET_ARM64_ROOT (default /var/cache/edgefleet/arm64-bookworm),
#              EDGEFLEET_ARM64_CPU (QEMU_CPU inside the root, default cortex-a72),
#              EDGEFLEET_DEBIAN_MIRROR (default: the Debian mirror of this host's apt sources,
#              else http://deb.debian.org/debian).
set -euo pipefail

ROOT=${EDGEFLEET_ARM64_ROOT:-/var/cache/edgefleet/arm64-bookworm}
SUITE=bookworm
# Bump RECIPE when the root's contents change: a stale root is rebuilt once.
RECIPE=1
PACKAGES="python3 python3-venv python3-pip mosquitto mosquitto-clients ca-certificates procps"
STAMP="$ROOT/.edgefleet-root"
WANT_STAMP="recipe=$RECIPE suite=$SUITE arch=arm64 packages=$PACKAGES"
LOCK="${ROOT%/}.lock"
QEMU=/usr/bin/qemu-aarch64-static
# The emulated CPU: a Raspberry Pi 4's core. QEMU's default ("max") has SME/SVE2, which no Pi has,
# and LiteRT's XNNPACK int8 kernels give wrong results on it under this QEMU (docs/arm64.md).
ARM64_CPU=${EDGEFLEET_ARM64_CPU:-cortex-a72}
BINFMT=/proc/sys/fs/binfmt_misc

say() { echo "arm64-root: $*"; }
unavailable() { echo "arm64 root unavailable: $*"; exit 3; }

is_ready() {
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" && -x "$ROOT/usr/bin/python3" ]]
}

# ---- the host side: tools, binfmt_misc, the mirror ------------------------------------------------

ensure_tools() {
  local missing=()
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  [[ -x $QEMU ]] || missing+=(qemu-user-static)
  command -v update-binfmts >/dev/null 2>&1 || missing+=(binfmt-support)
  ((${#missing[@]} == 0)) && return 0
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    unavailable "missing ${missing[*]}; install with: sudo apt-get install debootstrap qemu-user-static binfmt-support"
  fi
  say "installing ${missing[*]} with apt-get ..."
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq debootstrap qemu-user-static binfmt-support >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get install -y -qq debootstrap qemu-user-static binfmt-support >/dev/null 2>&1 ||
      unavailable "apt-get could not install debootstrap qemu-user-static binfmt-support"
  fi
}

ensure_binfmt() {
  if [[ ! -e $BINFMT/register ]]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null ||
      unavailable "binfmt_misc is not mounted and cannot be (mount -t binfmt_misc binfmt_misc $BINFMT failed)"
  fi
  if [[ ! -e $BINFMT/qemu-aarch64 ]]; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || update-binfmts --import qemu-aarch64 >/dev/null 2>&1 || true
  fi
  if [[ ! -e $BINFMT/qemu-aarch64 ]]; then
    # binfmt-support could not register it (no service manager): Debian's entry by hand, with the
    # F flag (the kernel keeps the interpreter open, so it works inside a chroot).
    local interp=/usr/libexec/qemu-binfmt/aarch64-binfmt-P flags=PF
    [[ -x $interp ]] || { interp=$QEMU; flags=F; }
    printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$interp:$flags" \
      >"$BINFMT/register" 2>/dev/null || true
  fi
  [[ -e $BINFMT/qemu-aarch64 ]] || unavailable "cannot register qemu-aarch64 with binfmt_misc"
  grep -q '^enabled' "$BINFMT/qemu-aarch64" || echo 1 >"$BINFMT/qemu-aarch64" 2>/dev/null ||
    unavailable "the qemu-aarch64 binfmt_misc entry is disabled and cannot be enabled"
}

pick_mirror() {
  if [[ -n ${EDGEFLEET_DEBIAN_MIRROR:-} ]]; then
    echo "$EDGEFLEET_DEBIAN_MIRROR"
    return
  fi
  local uri
  # The first Debian (not -security) URI of this host's apt sources, deb822 or one-line style.
  uri=$( { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
           grep -h '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
             sed -E 's/^deb (\[[^]]*\] )?//' | awk '{print $1}'; } |
         grep -E '/debian/?$' | grep -v -- '-security' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

reachable() {
  local url="${1%/}/dists/$SUITE/Release"
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 30 -o /dev/null "$url" 2>/dev/null
  else
    wget -q -T 30 -O /dev/null "$url" 2>/dev/null
  fi
}

# ---- mounts --------------------------------------------------------------------------------------

MOUNTED_ROOT=""
mount_root() {   # $1: root directory
  local r=$1
  MOUNTED_ROOT=$r
  mountpoint -q "$r/proc" || mount -t proc proc "$r/proc"
  arm_cpuinfo "$r"
  mountpoint -q "$r/sys" || { mount --rbind /sys "$r/sys" && mount --make-rslave "$r/sys"; }
  mountpoint -q "$r/dev" || { mount --rbind /dev "$r/dev" && mount --make-rslave "$r/dev"; }
  # pip and the tests need DNS and the host's CA bundle; the root's own copy, refreshed each start.
  cp -L /etc/resolv.conf "$r/etc/resolv.conf" 2>/dev/null || true
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    mkdir -p "$r/etc/ssl"
    cp -L /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/host-ca-bundle.crt"
  fi
}

# qemu-user (7.2, bookworm's) shows the guest the x86 host's /proc/cpuinfo. The ARM builds of
# LiteRT >= 2.2 parse it at the first interpreter (pytorch/cpuinfo, cpuinfo_arm_linux_init) and
# crash with SIGSEGV on x86 contents. Newer QEMU emulates an ARM /proc/cpuinfo; this does the same:
# a Raspberry Pi 4 style one (Cortex-A72) with as many processors as the host has, over
# /proc/cpuinfo inside the root only.
arm_cpuinfo() {  # $1: root directory (its /proc already mounted)
  local r=$1 n i file
  file="$r/etc/edgefleet-cpuinfo"
  n=$(getconf _NPROCESSORS_CONF 2>/dev/null || echo 1)
  : >"$file"
  for ((i = 0; i < n; i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i" >>"$file"
    printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' >>"$file"
  done
  printf 'Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B (emulated by qemu-user)\n' >>"$file"
  mount --bind "$file" "$r/proc/cpuinfo"
}

umount_root() {
  local r=${MOUNTED_ROOT:-}
  [[ -n $r ]] || return 0
  local m
  for m in dev sys proc; do
    if mountpoint -q "$r/$m"; then
      umount -R "$r/$m" 2>/dev/null || umount -R -l "$r/$m" 2>/dev/null || true
    fi
  done
  MOUNTED_ROOT=""
}

in_root() {      # $1: root, rest: command (clean environment)
  local r=$1
  shift
  chroot "$r" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 LC_ALL=C.UTF-8 TMPDIR=/tmp DEBIAN_FRONTEND=noninteractive QEMU_CPU="$ARM64_CPU" \
    ${CI:+CI=$CI} ${EDGEFLEET_ARM64_ENV:-} "$@"
}

# ---- the build -----------------------------------------------------------------------------------

build_root() {
  local mirror tmp log
  mirror=$(pick_mirror)
  reachable "$mirror" || { [[ $mirror != http://deb.debian.org/debian ]] && reachable http://deb.debian.org/debian &&
                           mirror=http://deb.debian.org/debian; } ||
    unavailable "the Debian mirror $mirror is unreachable (no $SUITE Release file)"
  tmp="$ROOT.partial"
  log="${ROOT%/}.log"
  mkdir -p "$(dirname "$ROOT")"
  : >"$log"
  MOUNTED_ROOT=$tmp umount_root
  rm -rf --one-file-system "$tmp"
  say "building the arm64 $SUITE root in $ROOT from $mirror (about 5 minutes; log: $log) ..."
  local t0=$SECONDS
  say "  debootstrap, first stage (host) ..."
  debootstrap --arch=arm64 --foreign --variant=minbase "$SUITE" "$tmp" "$mirror" >>"$log" 2>&1 ||
    { tail -n 5 "$log" >&2; echo "arm64-root: debootstrap first stage failed (see $log)" >&2; exit 1; }
  cp "$QEMU" "$tmp/usr/bin/"   # harmless when binfmt_misc has the F flag, needed when it has not
  say "  debootstrap, second stage (emulated) ..."
  chroot "$tmp" /debootstrap/debootstrap --second-stage >>"$log" 2>&1 ||
    { tail -n 5 "$log" >&2; echo "arm64-root: debootstrap second stage failed (see $log)" >&2; exit 1; }
  local security=${mirror%/debian}/debian-security
  cat >"$tmp/etc/apt/sources.list" <<EOF
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb $security $SUITE-security main
EOF
  # A chroot has no service manager: never start daemons from maintainer scripts.
  printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
  chmod +x "$tmp/usr/sbin/policy-rc.d"
  # pip inside uses the host's CA bundle (copied in at every start).
  cat >"$tmp/etc/pip.conf" <<'EOF'
[global]
cert = /etc/ssl/host-ca-bundle.crt
disable-pip-version-check = true
default-timeout = 180
EOF
  local index
  index=$(python3 -m pip config get global.index-url 2>/dev/null || true)
  [[ -n $index ]] && echo "index-url = $index" >>"$tmp/etc/pip.conf"
  trap umount_root EXIT
  mount_root "$tmp"
  say "  apt-get install $PACKAGES (emulated) ..."
  if ! in_root "$tmp" apt-get update -qq >>"$log" 2>&1; then
    # security/updates suites may be missing on a private mirror: the main suite is enough.
    echo "deb $mirror $SUITE main" >"$tmp/etc/apt/sources.list"
    in_root "$tmp" apt-get update -qq >>"$log" 2>&1 ||
      { echo "arm64-root: apt-get update inside the root failed (see $log)" >&2; exit 1; }
  fi
  # shellcheck disable=SC2086
  in_root "$tmp" apt-get install -y -q --no-install-recommends $PACKAGES >>"$log" 2>&1 ||
    { tail -n 5 "$log" >&2; echo "arm64-root: apt-get install inside the root failed (see $log)" >&2; exit 1; }
  in_root "$tmp" apt-get clean >>"$log" 2>&1 || true
  local arch
  arch=$(in_root "$tmp" uname -m)
  [[ $arch == aarch64 ]] || { echo "arm64-root: uname -m inside the root says $arch, not aarch64" >&2; exit 1; }
  umount_root
  trap - EXIT
  rm -rf --one-file-system "$ROOT"
  mv "$tmp" "$ROOT"
  echo "$WANT_STAMP" >"$STAMP"
  say "ready: $ROOT ($(in_root_version)) in $((SECONDS - t0)) s"
}

in_root_version() {
  sed -n 's/^PRETTY_NAME="\(.*\)"/\1/p' "$ROOT/etc/os-release" 2>/dev/null || echo "?"
}

with_lock() {    # run "$@" holding the root's lock (one build or test run at a time)
  mkdir -p "$(dirname "$LOCK")"
  exec 9>"$LOCK"
  if ! flock -n 9; then
    say "waiting for another user of $ROOT ..."
    flock 9
  fi
  "$@"
}

prepare() {
  [[ $(id -u) -eq 0 ]] || unavailable "needs root for debootstrap, chroot and mounts; run: sudo $0 prepare"
  ensure_tools
  ensure_binfmt
  if is_ready; then
    say "ready: $ROOT ($(in_root_version))"
    return 0
  fi
  build_root
}

run_in() {
  [[ $(id -u) -eq 0 ]] || { echo "arm64-root: needs root (chroot and mounts)" >&2; exit 1; }
  is_ready || { echo "arm64-root: $ROOT is not prepared; run: $0 prepare" >&2; exit 1; }
  ensure_binfmt
  trap umount_root EXIT
  trap 'umount_root; exit 130' INT TERM
  mount_root "$ROOT"
  local rc=0
  in_root "$ROOT" "$@" || rc=$?
  umount_root
  trap - EXIT INT TERM
  return $rc
}

cmd=${1:-prepare}
[[ $# -gt 0 ]] && shift
case $cmd in
  prepare)
    # Before the lock: a user who cannot write next to the root gets the one line, not an error.
    [[ $(id -u) -eq 0 ]] || unavailable "needs root for debootstrap, chroot and mounts; run: sudo $0 prepare"
    with_lock prepare ;;
  status)
    if is_ready; then say "ready: $ROOT ($(in_root_version))"; else say "not prepared: $ROOT"; exit 1; fi ;;
  run)
    [[ $# -gt 0 ]] || { echo "usage: $0 run CMD [ARGS...]" >&2; exit 2; }
    with_lock run_in "$@" ;;
  clean)
    with_lock bash -c "true"
    MOUNTED_ROOT=$ROOT umount_root
    MOUNTED_ROOT=$ROOT.partial umount_root
    rm -rf --one-file-system "$ROOT" "$ROOT.partial"
    say "removed $ROOT" ;;
  *) echo "usage: $0 [prepare|status|run CMD...|clean]" >&2; exit 2 ;;
esac
