#!/usr/bin/env bash
# Idempotent set-up for Kiln: make sure a Vulkan device is visible to wgpu.
# On a machine with a real GPU driver this does nothing. On a machine with no Vulkan device (CI, a laptop without
# drivers, a container) it installs Mesa's lavapipe, a software Vulkan GPU, so every WGSL kernel really runs.
set -euo pipefail

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

if have_vulkan_icd && have_loader; then
  echo "setup: a Vulkan driver and loader are present; nothing to install."
  exit 0
fi

if [[ "$(uname -s)" != "Linux" ]]; then
  echo "setup: no Vulkan driver found. On macOS wgpu uses Metal and on Windows DX12/Vulkan: install your GPU driver." >&2
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: no Vulkan driver found and apt-get is unavailable. Install your GPU's Vulkan driver, or Mesa's" >&2
  echo "       lavapipe (package usually named mesa-vulkan-drivers) and the Vulkan loader (libvulkan1)." >&2
  exit 1
fi

SUDO=""
if [[ "$(id -u)" != "0" ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "setup: installing Mesa lavapipe needs root. Run as root:" >&2
    echo "       apt-get update && apt-get install -y mesa-vulkan-drivers libvulkan1" >&2
    exit 1
  fi
fi

echo "setup: no Vulkan device found; installing Mesa lavapipe (software Vulkan) and the Vulkan loader."
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
if have_vulkan_icd && have_loader; then
  echo "setup: lavapipe installed."
else
  echo "setup: installation finished but no Vulkan driver manifest is visible; check /usr/share/vulkan/icd.d." >&2
  exit 1
fi
