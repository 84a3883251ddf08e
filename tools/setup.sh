#!/usr/bin/env bash
# Installs every Debian 12 package memsnap needs to build, test and benchmark. Idempotent: it
# only calls apt-get when a package is missing. Run as root (or through sudo).
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git python3
  libboost-dev libboost-filesystem-dev   # Boost.DLL (plugin loading)
  libspdlog-dev libfmt-dev               # logging
  libxxhash-dev                          # snapshot checksums (XXH3-64)
  nlohmann-json3-dev                     # JSON output of the CLI
  libyaml-cpp-dev                        # configuration files
  prometheus-cpp-dev                     # metrics
  libgtest-dev libgmock-dev googletest   # tests
  libbenchmark-dev                       # benchmarks
  prometheus                             # promtool checks and the real Prometheus of the metrics tests
  qemu-system-x86                        # the real VMM of the QEMU end-to-end tests (microvm, TCG)
  linux-image-amd64                      # the guest kernel (tools/qemu-guest extracts its vmlinux)
  busybox-static                         # the guest's userland in the initramfs
  cpio                                   # packs the guest initramfs
  xz-utils zstd                          # decompressors the vmlinux extractor may need
  clang libclang-rt-14-dev               # tools/fuzz.sh: clang and libFuzzer's runtime
  man-db groff-base                      # man: the tests render the generated manual pages
  ccache                                 # developers: -DCMAKE_CXX_COMPILER_LAUNCHER=ccache
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "setup: installing ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
# INITRD=No: the kernel package is only a source of the guest's vmlinux; building a host initrd
# for it would cost minutes for nothing.
$SUDO env DEBIAN_FRONTEND=noninteractive INITRD=No apt-get install -y -qq --no-install-recommends \
  -o DPkg::Lock::Timeout=600 "${missing[@]}"
