#!/usr/bin/env bash
# Builds the QEMU test guest from Debian's packages only:
#   OUTDIR/vmlinux            the uncompressed ELF kernel of linux-image-amd64 (boots under
#                             -M microvm through its PVH entry point)
#   OUTDIR/initramfs.cpio.gz  busybox-static, an /init script and the memory checker
# Usage: build-guest.sh OUTDIR CHECKER_BINARY
# Fast when the outputs are newer than their inputs. Needs linux-image-amd64, busybox-static,
# cpio and the decompressor of the kernel (xz-utils on Debian 12): bash tools/setup.sh.
set -euo pipefail

die() { echo "build-guest: error: $*" >&2; exit 1; }

[ $# -eq 2 ] || die "usage: $0 OUTDIR CHECKER_BINARY"
outdir=$1
checker=$2
self=$(readlink -f "${BASH_SOURCE[0]}")
if [ ! -f "$checker" ] || [ ! -x "$checker" ]; then
  die "checker binary '$checker' not found or not executable"
fi

# The newest installed Debian kernel (MEMSNAP_GUEST_KERNEL overrides).
kernel=${MEMSNAP_GUEST_KERNEL:-}
if [ -z "$kernel" ]; then
  kernel=$(shopt -s nullglob; k=(/boot/vmlinuz-*-amd64)
           [ ${#k[@]} -eq 0 ] || printf '%s\n' "${k[@]}" | sort -V | tail -n 1)
fi
if [ -z "$kernel" ] || [ ! -f "$kernel" ]; then
  die "no kernel at /boot/vmlinuz-*-amd64: install the package linux-image-amd64 (bash tools/setup.sh)"
fi
[ -r "$kernel" ] || die "cannot read $kernel (run as root, or set MEMSNAP_GUEST_KERNEL to a readable copy)"
busybox=/bin/busybox
if [ ! -x "$busybox" ] || ! "$busybox" --list >/dev/null 2>&1; then
  die "no $busybox: install the package busybox-static (bash tools/setup.sh)"
fi
file_of_busybox=$(od -A n -t x1 -j 0 -N 4 "$busybox" | tr -d ' ')
[ "$file_of_busybox" = 7f454c46 ] || die "$busybox is not an ELF binary"
command -v cpio >/dev/null || die "no cpio: install the package cpio (bash tools/setup.sh)"

mkdir -p "$outdir"
vmlinux=$outdir/vmlinux
initramfs=$outdir/initramfs.cpio.gz

# newer_than OUT IN...: true when OUT exists and is newer than every IN.
newer_than() {
  local out=$1; shift
  [ -e "$out" ] || return 1
  local in
  for in in "$@"; do [ "$out" -nt "$in" ] || return 1; done
}

# --- vmlinux ----------------------------------------------------------------------------------
# A bzImage is the real-mode setup (setup_sects+1 sectors of 512 bytes) followed by the protected
# mode code, which holds the compressed kernel. Boot protocol >= 2.08 says exactly where:
# payload_offset (u32 at 0x248, from the start of the protected-mode code) and payload_length
# (u32 at 0x24c). The payload's first bytes say how it is compressed; most formats have the
# uncompressed size appended (4 bytes), which the decompressors are told to ignore.
u8()  { od -A n -t u1 -j "$2" -N 1 "$1" | tr -d ' '; }
u16() { od -A n -t u2 --endian=little -j "$2" -N 2 "$1" | tr -d ' '; }
u32() { od -A n -t u4 --endian=little -j "$2" -N 4 "$1" | tr -d ' '; }
hex_at() { od -A n -t x1 -j "$2" -N "$3" "$1" | tr -d ' \n'; }

extract_vmlinux() {
  local image=$1 out=$2
  [ "$(hex_at "$image" 514 4)" = 48647253 ] || die "$image is not a bzImage (no HdrS header)"
  local version setup_sects pm_start payload_offset payload_length start magic tool
  version=$(u16 "$image" 518)
  [ "$version" -ge 520 ] || die "$image: boot protocol $((version >> 8)).$((version & 255)) < 2.08 has no payload fields"
  setup_sects=$(u8 "$image" 497)
  [ "$setup_sects" -ne 0 ] || setup_sects=4
  pm_start=$(( (setup_sects + 1) * 512 ))
  payload_offset=$(u32 "$image" 584)
  payload_length=$(u32 "$image" 588)
  start=$((pm_start + payload_offset))
  if [ "$payload_length" -eq 0 ] || [ $((start + payload_length)) -gt "$(stat -c %s "$image")" ]; then
    die "$image: payload $start+$payload_length lies outside the file"
  fi
  magic=$(hex_at "$image" "$start" 6)
  case $magic in
    fd377a585a00*) tool="xz -dc --single-stream" ;;
    1f8b*)         tool="gzip -dc" ;;
    28b52ffd*)     tool="zstd -dcq" ;;
    02214c18*)     tool="lz4 -dc" ;;
    425a68*)       tool="bzip2 -dc" ;;
    5d0000*)       tool="xz -dc --format=lzma" ;;
    894c5a4f*)     tool="lzop -dc" ;;
    *) die "$image: unknown compression (payload starts with $magic)" ;;
  esac
  command -v "${tool%% *}" >/dev/null ||
    die "$image is compressed with ${tool%% *}, which is not installed (bash tools/setup.sh)"
  echo "build-guest: extracting $image (${tool%% *}, $payload_length bytes at $start)" >&2
  # The decompressor may complain about the appended size (trailing data): judge by the result.
  tail -c +"$((start + 1))" "$image" | head -c "$payload_length" | $tool > "$out.tmp" 2>"$out.err" || true
  if [ "$(hex_at "$out.tmp" 0 4)" != 7f454c46 ]; then
    cat "$out.err" >&2
    rm -f "$out.tmp" "$out.err"
    die "$image: the decompressed kernel is not an ELF file"
  fi
  rm -f "$out.err"
  mv -f "$out.tmp" "$out"
}

if newer_than "$vmlinux" "$kernel" "$self"; then
  echo "build-guest: $vmlinux is up to date" >&2
else
  extract_vmlinux "$kernel" "$vmlinux"
  if command -v readelf >/dev/null && ! readelf -n "$vmlinux" 2>/dev/null | grep -q 'Xen'; then
    echo "build-guest: warning: $vmlinux has no PVH (Xen ELF) note; -M microvm may not boot it" >&2
  fi
fi

# --- initramfs --------------------------------------------------------------------------------
if newer_than "$initramfs" "$checker" "$busybox" "$self"; then
  echo "build-guest: $initramfs is up to date" >&2
else
  root=$(mktemp -d "$outdir/initramfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run}
  cp "$busybox" "$root/bin/busybox"
  for applet in $("$busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  cp "$checker" "$root/bin/memsnap-guest-check"
  chmod 0755 "$root/bin/memsnap-guest-check"
  # The kernel's built-in initramfs already has /dev/console, so the first lines reach the
  # console; devtmpfs then gives every device.
  cat > "$root/init" <<'INIT'
#!/bin/busybox sh
# memsnap QEMU test guest: run the memory checker on the serial console, forever.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
export PATH=/bin
/bin/memsnap-guest-check
echo "MEMSNAP-CHECK DIED status=$?"
# The checker never exits on its own: stop here (init must not exit, or the kernel panics).
while :; do sleep 3600; done
INIT
  chmod 0755 "$root/init"
  ( cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
      cpio --quiet -o -H newc -R 0:0 --reproducible ) | gzip -9n > "$initramfs.tmp"
  mv -f "$initramfs.tmp" "$initramfs"
  rm -rf "$root"
  trap - EXIT
fi
# Both outputs are now current: mark them so, so a build system that ran this script for one
# changed input does not run it again.
touch "$vmlinux" "$initramfs"
echo "build-guest: $vmlinux $initramfs" >&2
