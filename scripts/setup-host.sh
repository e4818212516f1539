#!/usr/bin/env bash
# Host set-up for vmd-py on Debian 12: apt packages (QEMU 10 from bookworm-backports,
# because 7.2 segfaults with vhost-user + MSI-X under TCG), the unprivileged sandbox user.
# Idempotent: each step checks before it acts, so `make test` can call it every time.
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "setup-host: must run as root" >&2; exit 1; }; }
need_root

stamp=/var/lib/vmd-py/setup-host.v3
if [ -f "$stamp" ] && command -v qemu-system-x86_64 >/dev/null && id _vmd >/dev/null 2>&1 \
   && id _vmdvm >/dev/null 2>&1; then
  exit 0
fi
mkdir -p /var/lib/vmd-py

. /etc/os-release
codename=${VERSION_CODENAME:-bookworm}
bp=/etc/apt/sources.list.d/vmd-py-backports.sources
if [ ! -f "$bp" ]; then
  echo "setup-host: enabling ${codename}-backports (QEMU only)"
  cat > "$bp" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: ${codename}-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
export DEBIAN_FRONTEND=noninteractive
echo "setup-host: apt-get update"
apt-get update -qq
pkgs=(python3-venv busybox-static iperf3 iputils-ping iproute2 cpio gzip kmod libseccomp2)
echo "setup-host: installing ${pkgs[*]}"
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
echo "setup-host: installing qemu-system-x86 from ${codename}-backports"
apt-get install -y -qq --no-install-recommends -t "${codename}-backports" qemu-system-x86 qemu-utils >/dev/null

# _vmd runs the sandboxed vionet workers and the control process; _vmdvm runs QEMU, so a
# compromised QEMU cannot signal or ptrace a worker.
for user in _vmd _vmdvm; do
  if ! id "$user" >/dev/null 2>&1; then
    echo "setup-host: creating system user $user"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user"
  fi
done
touch "$stamp"
echo "setup-host: done ($(qemu-system-x86_64 --version | head -1))"
