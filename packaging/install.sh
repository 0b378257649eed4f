#!/usr/bin/env bash
# Installs slb as a systemd service: binary, unit, man page, completions, a config skeleton.
# Usage (as root, from the repository): packaging/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo xtask setup
cargo build --release -p slb-user
install -m 0755 target/release/slb /usr/local/bin/slb
install -m 0644 packaging/slb.service /etc/systemd/system/slb.service
install -d -m 0755 /usr/local/share/man/man1 /usr/share/bash-completion/completions /var/log/slb
/usr/local/bin/slb manpage > /usr/local/share/man/man1/slb.1
/usr/local/bin/slb completions bash > /usr/share/bash-completion/completions/slb
install -d -m 0755 /etc/slb
if [ ! -e /etc/slb/slb.toml ]; then
  echo "write your config to /etc/slb/slb.toml (see README), then: systemctl enable --now slb"
fi
systemctl daemon-reload
