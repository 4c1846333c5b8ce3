#!/usr/bin/env bash
# Install what the SLURM tests (tests/test_cluster.py) start: SLURM's controller and node daemon,
# munge for authentication, slurmdbd and MariaDB for job accounting (sacct). Debian/Ubuntu, as root.
# The packages' services are not started here: the tests start and stop their own daemons.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm.sh: run as root (apt-get)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq slurm-wlm munge slurmdbd mariadb-server >/dev/null
for program in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd; do
    command -v "$program" >/dev/null || [ -x "/usr/sbin/$program" ] || { echo "install_slurm.sh: $program missing" >&2; exit 1; }
done
test -f /etc/munge/munge.key || { echo "install_slurm.sh: /etc/munge/munge.key missing" >&2; exit 1; }
echo "installed: $(/usr/sbin/slurmctld -V), munge, slurmdbd, MariaDB"
