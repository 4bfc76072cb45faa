#!/usr/bin/env bash
# System packages the tests use where they can have them (`make test` runs this first):
#   libsimde-dev  SIMDe's headers: the CPU kernels' emulated builds (tests/kernel_builds.py), which
#                 run the AVX-512, AVX512-BF16 and AMX paths on CPUs without those instructions.
# Installs with apt-get as root or through passwordless sudo; elsewhere it says what is missing and
# the tests that need it skip with the same advice. Never fails the build.
set -u

missing=()
[ -f /usr/include/simde/x86/avx512.h ] || missing+=(libsimde-dev)
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: ${missing[*]} not installed and no apt-get here: the emulated kernel tests will skip"
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "note: ${missing[*]} not installed (apt-get install ${missing[*]} as root): the emulated kernel tests will skip"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt() { timeout 300 "${as_root[@]}" apt-get "$@" >/dev/null 2>&1; } # bounded: a registry out of reach must not stall the tests
if ! apt install -y -q --no-install-recommends "${missing[@]}"; then
  apt update -q
  apt install -y -q --no-install-recommends "${missing[@]}" ||
    echo "note: apt-get could not install ${missing[*]}: the emulated kernel tests will skip"
fi
exit 0
