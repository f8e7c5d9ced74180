#!/usr/bin/env bash
# Idempotent set-up for Kiln: make sure a Vulkan device is visible to wgpu.
# On a machine with a real GPU driver this does nothing. On a machine with no Vulkan device (CI, a laptop without
# drivers, a container) it installs Mesa's lavapipe, a software Vulkan GPU, so every WGSL kernel really runs.
#
# `tools/setup.sh --mpi` also installs Open MPI (and libclang, which the `mpi` crate's bindings are generated
# with) for data-parallel training: `cargo build --release --features mpi`, then `mpirun -np N kiln pretrain ...`.
set -euo pipefail

want_mpi=0
for arg in "$@"; do
  case "$arg" in
    --mpi) want_mpi=1 ;;
    *) echo "setup: unknown option $arg (known: --mpi)" >&2; exit 2 ;;
  esac
done

have_vulkan_icd() {
  # A Vulkan installable client driver (ICD) manifest is what the loader looks for; any one means a device.
  local d
  for d in /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d; do
    if compgen -G "$d/*.json" >/dev/null 2>&1; then return 0; fi
  done
  return 1
}

have_loader() {
  ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'
}

have_mpi() {
  command -v mpicc >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1 \
    && ldconfig -p 2>/dev/null | grep -q 'libclang' && command -v pkg-config >/dev/null 2>&1
}

# Installs Debian packages "$@" (with sudo when not root), explaining `what` when that is impossible.
SUDO=""
apt_install() {
  local what="$1"; shift
  if [[ "$(uname -s)" != "Linux" ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: $what is missing and apt-get is unavailable; install the packages $* (or your system's" >&2
    echo "       equivalents) by hand." >&2
    exit 1
  fi
  if [[ "$(id -u)" != "0" ]]; then
    if command -v sudo >/dev/null 2>&1; then
      SUDO="sudo"
    else
      echo "setup: installing $what needs root. Run as root:" >&2
      echo "       apt-get update && apt-get install -y $*" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "$@" >/dev/null
}

if have_vulkan_icd && have_loader; then
  echo "setup: a Vulkan driver and loader are present; nothing to install."
elif [[ "$(uname -s)" != "Linux" ]]; then
  echo "setup: no Vulkan driver found. On macOS wgpu uses Metal and on Windows DX12/Vulkan: install your GPU driver." >&2
else
  echo "setup: no Vulkan device found; installing Mesa lavapipe (software Vulkan) and the Vulkan loader."
  # spirv-tools: the shader translation test also validates the SPIR-V naga writes (spirv-val).
  apt_install "Mesa lavapipe" mesa-vulkan-drivers libvulkan1 spirv-tools
  if have_vulkan_icd && have_loader; then
    echo "setup: lavapipe installed."
  else
    echo "setup: installation finished but no Vulkan driver manifest is visible; check /usr/share/vulkan/icd.d." >&2
    exit 1
  fi
fi

if [[ "$want_mpi" == 1 ]]; then
  if have_mpi; then
    echo "setup: MPI (mpicc, mpirun) and libclang are present; nothing to install."
  else
    echo "setup: installing Open MPI and libclang for data-parallel training (--features mpi)."
    apt_install "Open MPI" libopenmpi-dev openmpi-bin libclang-dev pkg-config
    have_mpi || { echo "setup: Open MPI installed but mpicc/mpirun/libclang are not all visible." >&2; exit 1; }
    echo "setup: Open MPI installed ($(mpirun --version 2>/dev/null | head -1))."
  fi
fi
