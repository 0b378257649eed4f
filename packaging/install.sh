#!/usr/bin/env bash
# Installs slb as a systemd service from this repository: builds the Debian package
# (`cargo xtask package`; its contents are listed in slb-user/Cargo.toml, [package.metadata.deb])
# and installs it with apt, which also pulls in what it depends on.
# Usage (as root, from anywhere in the repository): packaging/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(cargo xtask package)

# Earlier versions of this script installed into /usr/local and /etc/systemd/system; a unit
# there would shadow the packaged one and run the old binary.
for old in /usr/local/bin/slb /usr/local/share/man/man1/slb.1; do
  if [ -e "$old" ]; then
    echo "removing $old (installed by an earlier install.sh)"
    rm -f "$old"
  fi
done
if [ -e /etc/systemd/system/slb.service ]; then
  echo "moving /etc/systemd/system/slb.service (installed by an earlier install.sh) to" \
    "/etc/systemd/system/slb.service.old: the package's unit is /usr/lib/systemd/system/slb.service"
  mv /etc/systemd/system/slb.service /etc/systemd/system/slb.service.old
fi

# An /etc/slb/slb.toml that is already there (an operator's config) is kept.
apt-get install -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$deb"
echo "edit /etc/slb/slb.toml (see README), then: systemctl enable --now slb"
