#!/usr/bin/env bash
# Make sure the system services the tests need are there: PostgreSQL server binaries (for the
# throwaway clusters) and a running MariaDB. Installs from Debian's packages when missing (root).
set -u
have_pg() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
if ! have_pg && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
if ! command -v mariadbd >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server >/dev/null
fi
# Headless Chromium for the Manage page's browser tests (Debian's package; never a downloaded build).
if ! [ -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if command -v mariadb-admin >/dev/null 2>&1 && ! mariadb-admin -uroot -h127.0.0.1 ping >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql >/dev/null 2>&1
    for _ in $(seq 1 30); do mariadb-admin -uroot -h127.0.0.1 ping >/dev/null 2>&1 && break; sleep 1; done
  fi
fi
exit 0
