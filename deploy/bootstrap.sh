#!/usr/bin/env bash
# bootstrap.sh: first boot of a new database instance (cloud-init runcmd, or a
# first-boot unit): prepare the data volume with volprep, then restore the
# latest backup and, with a source, start replicating from it.
#
# Settings, from arguments or the environment (arguments win):
#   --config PATH              MYSNAP_CONFIG              (default /etc/mysnap/mysnap.toml)
#   --backup ID|latest         MYSNAP_BACKUP              (default latest)
#   --replica-of HOST:PORT     MYSNAP_REPLICA_OF          (empty: restore without replication)
#   --replication-user U       MYSNAP_REPLICATION_USER    (default repl)
#   --replication-password-file F
#                              MYSNAP_REPLICATION_PASSWORD_FILE (default /etc/mysnap/repl.pass)
#   --fstab / --no-fstab       MYSNAP_FSTAB=1|0           (default 1: mount at boot, nofail)
#   --move-datadir FROM        MYSNAP_MOVE_DATADIR        (an existing data directory to move)
#   --bin-dir DIR              MYSNAP_BIN_DIR             (default /usr/local/bin)
# No secret is ever passed in argv: the replication password is read by the
# restorer from its file (mode 0600), S3 credentials come from the AWS chain.
#
# Safe to run again: volprep changes nothing that is in place, and a restore
# that completed leaves STATE_DIR/bootstrap.done, after which it is skipped.
set -euo pipefail

CONFIG=${MYSNAP_CONFIG:-/etc/mysnap/mysnap.toml}
BACKUP=${MYSNAP_BACKUP:-latest}
REPLICA_OF=${MYSNAP_REPLICA_OF:-}
REPL_USER=${MYSNAP_REPLICATION_USER:-repl}
REPL_PASSWORD_FILE=${MYSNAP_REPLICATION_PASSWORD_FILE:-/etc/mysnap/repl.pass}
FSTAB=${MYSNAP_FSTAB:-1}
MOVE_DATADIR=${MYSNAP_MOVE_DATADIR:-}
BIN_DIR=${MYSNAP_BIN_DIR:-/usr/local/bin}

usage() {
    sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
    --config) CONFIG=${2:?}; shift 2 ;;
    --backup) BACKUP=${2:?}; shift 2 ;;
    --replica-of) REPLICA_OF=${2:?}; shift 2 ;;
    --replication-user) REPL_USER=${2:?}; shift 2 ;;
    --replication-password-file) REPL_PASSWORD_FILE=${2:?}; shift 2 ;;
    --fstab) FSTAB=1; shift ;;
    --no-fstab) FSTAB=0; shift ;;
    --move-datadir) MOVE_DATADIR=${2:?}; shift 2 ;;
    --bin-dir) BIN_DIR=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    *) echo "bootstrap.sh: unknown argument $1" >&2; usage ;;
    esac
done

log() { echo "bootstrap: $*" >&2; }
die() { echo "bootstrap: error: $*" >&2; exit "${2:-1}"; }

[ -r "$CONFIG" ] || die "cannot read $CONFIG: write the mysnap config first (see deploy/mysnap.example.toml)" 2
export MYSNAP_CONFIG=$CONFIG

volprep_args=()
[ "$FSTAB" = 1 ] && volprep_args+=(--fstab)
[ -n "$MOVE_DATADIR" ] && volprep_args+=(--move-datadir "$MOVE_DATADIR")
log "preparing the volume"
"$BIN_DIR/volprep" "${volprep_args[@]}"

# backup.state_dir, for the marker (default /var/lib/mysnap).
STATE_DIR=$(sed -n '/^\[backup\]/,/^\[/s/^[[:space:]]*state_dir[[:space:]]*=[[:space:]]*"\(.*\)".*/\1/p' "$CONFIG" | head -n1)
STATE_DIR=${STATE_DIR:-/var/lib/mysnap}
MARKER=$STATE_DIR/bootstrap.done
if [ -e "$MARKER" ]; then
    log "restored already ($(cat "$MARKER")); nothing to do"
    exit 0
fi

restore_args=(restore "$BACKUP")
if [ -n "$REPLICA_OF" ]; then
    [ -r "$REPL_PASSWORD_FILE" ] || die "cannot read the replication password file $REPL_PASSWORD_FILE" 2
    perms=$(stat -c %a "$REPL_PASSWORD_FILE")
    case "$perms" in
    [0-7]00) ;;
    *) die "$REPL_PASSWORD_FILE is readable by others (mode $perms): chmod 600 it" 2 ;;
    esac
    restore_args+=(--replica-of "$REPLICA_OF" --replication-user "$REPL_USER"
        --replication-password-file "$REPL_PASSWORD_FILE")
fi
log "restoring backup $BACKUP${REPLICA_OF:+ as a replica of $REPLICA_OF}"
result=$("$BIN_DIR/restorer" "${restore_args[@]}")
mkdir -p "$STATE_DIR"
printf '%s\n' "$result" >"$MARKER"
printf '%s\n' "$result"
log "done"
