#!/usr/bin/env bash
# The LVM end-to-end test, run inside a virtme-ng VM by `cargo xtask vm-test`
# (the host kernel has no device-mapper). Everything stays on the VM's own
# loopback; the VM has no network.
#
#   inside.sh BIN_DIR OUT_DIR
#
# BIN_DIR: the host's target/debug (read-only in the VM). OUT_DIR: writable;
# gets `result` (PASS or FAIL: step) and `metrics` (key=value lines).
# Volumes are loop files on the VM's tmpfs, sockets under /dev/shm.
#
# 1. volprep (--dry-run, real with --move-datadir and --fstab, again: no change,
#    refusal of a foreign filesystem) on a loop file: PV, VG, LV, xfs, mount.
# 2. MariaDB on the LV, sysbench data and load; a handed-off backup left
#    (a second snapshotter refuses over it), then aged past
#    backup.handoff_grace; `snapshotter | archiver` to the S3 test server:
#    the stale snapshot is removed, the backup lands.
# 3. A second volume; restore refused while it is not mounted; a server on
#    it; `restorer restore latest --replica-of`; once
#    the replica caught up, every CHECKSUM TABLE matches the source.
# 4. Overflow: a tiny snapshot, heavy writes before the archive ends → the
#    backup fails, nothing is listed, no snapshot LV is left.
# 5. mysql.max_hold: lvcreate makes the snapshot and hangs → the lock is
#    ended at the bound, exit 3, writers go on, the snapshot LV is removed.
set -euo pipefail

BIN=${1:?usage: inside.sh BIN_DIR OUT_DIR}
OUT=${2:?usage: inside.sh BIN_DIR OUT_DIR}
export PATH=$BIN:/usr/sbin:/sbin:$PATH
export LVM_SUPPRESS_FD_WARNINGS=1
# LVM waits for udev to confirm every device change; a udev worker that
# stalls in the emulated VM would leave lvcreate/lvremove waiting forever.
# The VM runs LVM as containers do: libdevmapper makes its own device nodes.
export DM_DISABLE_UDEV=1
STEP="start"
D=$(mktemp -d /dev/shm/mysnap-vm.XXXXXX)
RUN=$D/run
mkdir -p "$RUN"
echo "FAIL: did not finish" >"$OUT/result"
: >"$OUT/metrics"

step() {
    STEP="$*"
    echo "$STEP" >"$OUT/step"
    echo "== $(date +%T) $*"
}
fail() {
    echo "FAILED: $*" >&2
    exit 1
}
elapsed() { # START (date +%s.%N) -> seconds since
    awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}
metric() {
    echo "$1=$2" | tee -a "$OUT/metrics"
}

cleanup() {
    set +e
    for s in "$RUN"/*.sock; do
        [ -S "$s" ] && mariadb-admin -S "$s" -uroot shutdown 2>/dev/null
    done
    [ -n "${S3_PID:-}" ] && kill "$S3_PID" 2>/dev/null
    for m in $(awk '{print $5}' /proc/self/mountinfo | grep "^$D/" | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m"
    done
    vgchange -an mysnapsrc mysnapdst >/dev/null 2>&1
    losetup -a | grep "$D/" | cut -d: -f1 | xargs -r -n1 losetup -d
}
on_exit() {
    rc=$?
    if [ $rc -ne 0 ]; then
        echo "FAIL: $STEP (exit $rc)" >"$OUT/result"
        echo "VM TEST FAILED at step: $STEP (exit $rc)" >&2
        for f in "$RUN"/*.err; do
            [ -f "$f" ] && { echo "--- tail of $f" >&2; tail -n 15 "$f" >&2; }
        done
    fi
    set +e
    if [ -n "${WATCHDOG:-}" ]; then
        # The watchdog first (so its sleep ending does not start a diagnosis), then its sleep.
        local sleeper
        sleeper=$(pgrep -P "$WATCHDOG")
        kill "$WATCHDOG" $sleeper 2>/dev/null
    fi
    [ -n "${HEARTBEAT:-}" ] && kill "$HEARTBEAT" $(pgrep -P "$HEARTBEAT") 2>/dev/null
    cleanup
    exit $rc
}
trap on_exit EXIT

# What the VM looks like when a step hangs: processes with their kernel wait
# channel, device-mapper and udev state, the logs. Each probe is bounded.
diagnose() {
    echo "=== diagnosis at $(date +%T), step: $(cat "$OUT/step" 2>/dev/null)"
    cat /proc/loadavg
    ps -eo pid,ppid,stat,wchan:28,etime,args --forest | grep -v ' \[.*\]$'
    echo "--- dmsetup info -c"; timeout -k 2 10 dmsetup info -c
    echo "--- dmsetup udevcookies"; timeout -k 2 10 dmsetup udevcookies
    echo "--- lvs -a"; timeout -k 2 10 lvs -a
    echo "--- kernel messages"; dmesg | tail -n 40
    echo "--- mounts under $D"; grep " $D/" /proc/self/mountinfo
    for f in "$RUN"/*.log "$RUN"/*.err; do
        [ -f "$f" ] && { echo "--- tail of $f"; tail -n 20 "$f"; }
    done
}
# A hung step must not eat the host's whole budget silently: after
# MYSNAP_VM_DEADLINE seconds the watchdog records a diagnosis in $OUT/diag and
# kills the script's children, so on_exit reports the step.
(
    sleep "${MYSNAP_VM_DEADLINE:-1500}"
    diagnose >"$OUT/diag" 2>&1
    cat "$OUT/diag" >&2
    descendants() { for c in $(pgrep -P "$1"); do [ "$c" = "$BASHPID" ] || { descendants "$c"; echo "$c"; }; done; }
    descendants $$ | xargs -r kill -KILL 2>/dev/null
) &
WATCHDOG=$!
# A heartbeat for the host (cargo xtask vm-test): a count that stops when the
# whole VM stalls, where the watchdog above cannot run or write.
(
    i=0
    while :; do
        i=$((i + 1))
        echo "$i" >"$OUT/heartbeat"
        sleep 5
    done
) &
HEARTBEAT=$!

# A private MariaDB: start_command/stop_command for mysnap, and a wait.
server_cmds() { # NAME DATADIR PORT SERVER_ID -> sets START, STOP (TOML arrays)
    local name=$1 datadir=$2 port=$3 id=$4
    local args=(--user=root "--datadir=$datadir" "--socket=$RUN/$name.sock" "--pid-file=$RUN/$name.pid"
        "--log-error=$RUN/$name.err" "--log-bin=binlog" "--server-id=$id" "--port=$port"
        --bind-address=127.0.0.1 --innodb-buffer-pool-size=64M --innodb-log-file-size=16M)
    START_ARGV=(start-stop-daemon --start --background --pidfile "$RUN/$name.pid" --exec /usr/sbin/mariadbd -- "${args[@]}")
    STOP_ARGV=(mariadb-admin -S "$RUN/$name.sock" -uroot shutdown)
    START=$(printf '"%s", ' "${START_ARGV[@]}")
    START="[${START%, }]"
    STOP=$(printf '"%s", ' "${STOP_ARGV[@]}")
    STOP="[${STOP%, }]"
}
wait_db() { # NAME
    for _ in $(seq 1 240); do
        mariadb -S "$RUN/$1.sock" -uroot -e 'select 1' >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    fail "MariaDB $1 did not answer within 120 s"
}
sql() { # NAME SQL
    mariadb -S "$RUN/$1.sock" -uroot -N -B -e "$2"
}

write_config() { # FILE NAME VG DEVICE MNT PORT SERVER_ID BACKUP_NAME [EXTRA_VOLUME_LINES]
    local file=$1 name=$2 vg=$3 dev=$4 mnt=$5 port=$6 id=$7 bname=$8 extra=${9:-}
    server_cmds "$name" "${DATADIR_OF[$name]}" "$port" "$id"
    cat >"$file" <<EOF
[mysql]
socket = "$RUN/$name.sock"
user = "root"
lock_timeout = "5s"
lock_retries = 3
long_query_wait = "5s"
stop_command = $STOP
start_command = $START

[volume]
backend = "lvm"
device = "$dev"
vg = "$vg"
lv = "mysql"
mountpoint = "$mnt"
filesystem = "xfs"
snapshot_reserve_percent = 30
datadir = "$mnt/mysql"
owner = "root"
$extra

[store]
url = "s3://backups/vm"
endpoint = "http://$S3_ADDR"
region = "us-east-1"
force_path_style = true
part_size = "8MiB"
concurrency = 4

[archive]
compression = "zstd"
level = 3

[backup]
name = "$bname"
state_dir = "$D/state-$bname"
EOF
}

sysbench_cmd() { # NAME ...
    local name=$1
    shift
    sysbench oltp_read_write --db-driver=mysql "--mysql-socket=$RUN/$name.sock" --mysql-user=root \
        --mysql-db=sbtest --tables=4 --table-size=10000 "$@"
}

checksums() { # NAME
    sql "$1" "CHECKSUM TABLE sbtest.sbtest1, sbtest.sbtest2, sbtest.sbtest3, sbtest.sbtest4"
}

snapshot_lvs() { # VG: LVs other than the data LV
    lvs --noheadings -o lv_name "$1" | awk '{print $1}' | grep -v '^mysql$' || true
}

declare -A DATADIR_OF

step "kernel modules"
modprobe -a loop dm_mod dm_snapshot xfs
grep -q device-mapper /proc/misc || fail "no device-mapper in the VM's kernel"
if ls /sys/class/net | grep -vxq lo; then fail "the VM has a network interface ($(ls /sys/class/net)); it must have none"; fi

step "S3 test server on the VM's loopback"
export AWS_ACCESS_KEY_ID="MYSNAPVM$(od -An -tx4 -N8 /dev/urandom | tr -d ' ')"
export AWS_SECRET_ACCESS_KEY="$(od -An -tx4 -N16 /dev/urandom | tr -d ' ')"
export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
mkdir -p "$D/s3/backups"
mysnap-s3-test-server --root "$D/s3" --listen 127.0.0.1:0 >"$RUN/s3.addr" 2>"$RUN/s3.err" &
S3_PID=$!
for _ in $(seq 1 100); do [ -s "$RUN/s3.addr" ] && break; sleep 0.1; done
S3_ADDR=$(head -n1 "$RUN/s3.addr")
case "$S3_ADDR" in 127.0.0.1:*) ;; *) fail "S3 server printed '$S3_ADDR'" ;; esac

step "source server on a plain directory (to be moved onto the volume)"
SRC_PORT=13306
DST_PORT=13307
truncate -s 1G "$D/src.img"
DATADIR_OF[src]="$D/src-old"
mkdir -p "$D/src-old"
mariadb-install-db --user=root "--datadir=$D/src-old" --auth-root-authentication-method=normal >/dev/null
write_config "$D/src.toml" src mysnapsrc "$D/src.img" "$D/srcmnt" $SRC_PORT 1 db1
"${START_ARGV[@]}"
wait_db src
sql src "CREATE DATABASE sbtest; CREATE USER repl@'%' IDENTIFIED BY 'repl-secret'; GRANT REPLICATION SLAVE ON *.* TO repl@'%'; CREATE USER repl@localhost IDENTIFIED BY 'repl-secret'; GRANT REPLICATION SLAVE ON *.* TO repl@localhost"

step "volprep --dry-run prints the commands and changes nothing"
volprep --config "$D/src.toml" --dry-run --move-datadir "$D/src-old" >"$RUN/dry.out"
cat "$RUN/dry.out"
for c in "losetup -f --show" pvcreate "vgcreate -q mysnapsrc" "lvcreate" "-l 70%VG" mkfs.xfs "mount -t xfs" "cp -a"; do
    grep -qF -- "$c" "$RUN/dry.out" || fail "dry run did not print '$c'"
done
losetup -a | grep -q "$D/src.img" && fail "dry run attached a loop device"
vgs mysnapsrc >/dev/null 2>&1 && fail "dry run created a volume group"

step "volprep: PV, VG, LV, xfs, mount, fstab, data directory moved with the server stopped"
T0=$(date +%s.%N)
volprep --config "$D/src.toml" --move-datadir "$D/src-old" --fstab --fstab-file "$D/fstab" 2>"$RUN/volprep1.log" || { cat "$RUN/volprep1.log"; fail "volprep"; }
metric volprep_secs "$(elapsed "$T0")"
cat "$RUN/volprep1.log"
findmnt -n -o SOURCE,FSTYPE "$D/srcmnt" | grep -q xfs || fail "$D/srcmnt is not an xfs mount"
grep -q "^/dev/mysnapsrc/mysql $D/srcmnt xfs defaults,nofail 0 0$" "$D/fstab" || fail "fstab line: $(cat "$D/fstab")"
[ "$(readlink "$D/src-old")" = "$D/srcmnt/mysql" ] || fail "$D/src-old is not a link to the moved data directory"
lvs --noheadings -o lv_name,lv_size mysnapsrc
vgs --noheadings -o vg_name,vg_size,vg_free mysnapsrc
wait_db src

step "volprep again: everything in place, nothing changed"
volprep --config "$D/src.toml" --move-datadir "$D/src-old" --fstab --fstab-file "$D/fstab" 2>"$RUN/volprep2.log"
grep -q "nothing changed" "$RUN/volprep2.log" || { cat "$RUN/volprep2.log"; fail "second volprep run changed something"; }
[ "$(grep -c mysnapsrc "$D/fstab")" = 1 ] || fail "fstab line added twice"

step "volprep refuses a device holding a filesystem it did not create"
truncate -s 64M "$D/foreign.img"
mkfs.ext4 -q "$D/foreign.img"
sed "s#$D/src.img#$D/foreign.img#; s#mysnapsrc#mysnapforeign#; s#$D/srcmnt#$D/foreignmnt#g" "$D/src.toml" >"$D/foreign.toml"
set +e
volprep --config "$D/foreign.toml" 2>"$RUN/foreign.log"
rc=$?
set -e
cat "$RUN/foreign.log"
[ $rc = 1 ] || fail "volprep on a foreign ext4 exited $rc, not 1"
grep -q "ext4 filesystem that volprep did not create" "$RUN/foreign.log" || fail "no clear refusal"
vgs mysnapforeign >/dev/null 2>&1 && fail "a VG was created on the foreign device"

step "sysbench data on the LV"
sysbench_cmd src prepare >/dev/null
du -sh "$D/srcmnt/mysql"

step "a killed run: snapshotter alone leaves a snapshot"
stale_manifest=$(snapshotter --config "$D/src.toml" 2>"$RUN/stale.log") || { cat "$RUN/stale.log"; fail "snapshotter"; }
[ -f "$stale_manifest" ] || fail "snapshotter printed '$stale_manifest'"
[ -n "$(snapshot_lvs mysnapsrc)" ] || fail "no snapshot LV after snapshotter"
# A handed-off backup is kept for its archiver (backup.handoff_grace): a
# second snapshotter refuses to start over it...
rc=0; snapshotter --config "$D/src.toml" >/dev/null 2>"$RUN/overlap.log" || rc=$?
cat "$RUN/overlap.log"
[ $rc = 1 ] || fail "a snapshotter over a handed-off backup exited $rc, not 1"
grep -q "was handed off" "$RUN/overlap.log" || fail "no clear refusal over a handed-off backup"
[ -n "$(snapshot_lvs mysnapsrc)" ] || fail "the handed-off snapshot was removed"
# ...until no archiver claimed it within the grace: then it is a killed run's.
touch -d '-1 hour' "$stale_manifest"

step "snapshotter | archiver under load, to S3 on loopback"
sysbench_cmd src --time=25 --threads=2 --report-interval=0 run >"$RUN/load.out" 2>&1 &
LOAD=$!
sleep 3
T0=$(date +%s.%N)
set -o pipefail
snapshotter --config "$D/src.toml" 2>"$RUN/snap.log" | archiver --config "$D/src.toml" >"$RUN/id" 2>"$RUN/arch.log" || {
    cat "$RUN/snap.log" "$RUN/arch.log"
    fail "snapshotter | archiver"
}
metric backup_secs "$(elapsed "$T0")"
cat "$RUN/snap.log" "$RUN/arch.log"
grep -q "removing snapshot mysnap-db1-" "$RUN/snap.log" || fail "the stale snapshot was not removed by the next snapshotter"
ID=$(cat "$RUN/id")
[ -n "$(snapshot_lvs mysnapsrc)" ] && fail "snapshot LVs left: $(snapshot_lvs mysnapsrc)"
grep -q "$D/state-db1/mnt" /proc/self/mountinfo && fail "a snapshot mount is left"
metric lock_hold_secs "$(sed -n 's/.*held \([0-9.]*\)s.*/\1/p' "$RUN/snap.log" | tail -n1)"
metric lock_wait_secs "$(sed -n 's/.*lock waited \([0-9.]*\)s.*/\1/p' "$RUN/snap.log" | tail -n1)"
metric archive_rate "$(sed -n 's/.*in \([0-9.]*s\) (\(.*\/s\)).*/\2 over \1/p' "$RUN/arch.log" | tail -n1)"
metric archive_data "$(sed -n 's/.*files, \(.*\) of data stored as \(.*\) in .*/\1 data, \2 stored/p' "$RUN/arch.log" | tail -n1)"
restorer --config "$D/src.toml" list --json >"$RUN/list.json"
grep -q "$ID" "$RUN/list.json" || fail "restorer list does not show $ID: $(cat "$RUN/list.json")"
wait $LOAD || fail "sysbench load"

step "target: a second volume and server, restored as a replica"
truncate -s 1G "$D/dst.img"
DATADIR_OF[dst]="$D/dstmnt/mysql"
write_config "$D/dst.toml" dst mysnapdst "$D/dst.img" "$D/dstmnt" $DST_PORT 2 db1
volprep --config "$D/dst.toml" 2>"$RUN/volprep-dst.log" || { cat "$RUN/volprep-dst.log"; fail "volprep (target)"; }

step "restorer refuses a volume that is not mounted (a nofail fstab line on a dead disk)"
umount "$D/dstmnt"
set +e
restorer --config "$D/dst.toml" restore latest >/dev/null 2>"$RUN/unmounted.log"
rc=$?
set -e
cat "$RUN/unmounted.log"
[ $rc = 1 ] || fail "restore onto an unmounted volume exited $rc, not 1"
grep -q "is not mounted" "$RUN/unmounted.log" || fail "no clear refusal of the unmounted volume"
[ -z "$(ls -A "$D/dstmnt")" ] || fail "restore wrote below the unmounted mount point: $(ls -A "$D/dstmnt")"
mount /dev/mysnapdst/mysql "$D/dstmnt"
mariadb-install-db --user=root "--datadir=$D/dstmnt/mysql" --auth-root-authentication-method=normal >/dev/null
"${START_ARGV[@]}"
wait_db dst
printf 'repl-secret\n' >"$RUN/repl.pass"
chmod 600 "$RUN/repl.pass"
T0=$(date +%s.%N)
restorer --config "$D/dst.toml" restore latest --replica-of "127.0.0.1:$SRC_PORT" \
    --replication-user repl --replication-password-file "$RUN/repl.pass" >"$RUN/restore.json" 2>"$RUN/restore.log" || {
    cat "$RUN/restore.log"
    fail "restorer restore"
}
metric restore_secs "$(elapsed "$T0")"
cat "$RUN/restore.json"
grep -q "$ID" "$RUN/restore.json" || fail "restored another backup than $ID"
wait_db dst

step "the replica catches up and every table matches"
want=$(sql src "SELECT @@gtid_binlog_pos")
for i in $(seq 1 360); do
    [ "$(sql dst "SELECT @@gtid_slave_pos")" = "$want" ] && break
    [ "$i" = 360 ] && { sql dst "SHOW SLAVE STATUS\G"; fail "the replica did not catch up with $want"; }
    sleep 0.5
done
checksums src >"$RUN/sum.src"
checksums dst >"$RUN/sum.dst"
cat "$RUN/sum.src"
[ "$(wc -l <"$RUN/sum.src")" = 4 ] || fail "expected 4 checksums"
diff "$RUN/sum.src" "$RUN/sum.dst" || fail "CHECKSUM TABLE differs between source and restored replica"

step "overflow: a tiny snapshot and heavy writes fail the backup cleanly"
sed 's/^name = "db1"/name = "db1-overflow"/; s#state-db1#state-db1-overflow#; s/^owner = "root"/owner = "root"\nsnapshot_size = "8MiB"/' "$D/src.toml" >"$D/overflow.toml"
manifest=$(snapshotter --config "$D/overflow.toml" 2>"$RUN/ovf-snap.log") || { cat "$RUN/ovf-snap.log"; fail "snapshotter (overflow)"; }
lvs mysnapsrc
# 64 MiB of changed blocks on the origin while the archive runs: far past 8 MiB.
dd if=/dev/urandom of="$D/srcmnt/ballast" bs=1M count=64 oflag=direct status=none
sync
set +e
archiver --config "$D/overflow.toml" --manifest "$manifest" >"$RUN/ovf.id" 2>"$RUN/ovf-arch.log"
rc=$?
set -e
cat "$RUN/ovf-arch.log"
[ $rc -ne 0 ] || fail "the archiver succeeded on an overflowed snapshot"
[ -s "$RUN/ovf.id" ] && fail "the archiver printed a backup id"
grep -qiE "overflow|invalid|Input/output error" "$RUN/ovf-arch.log" || fail "the failure does not say the snapshot overflowed"
[ "$(restorer --config "$D/overflow.toml" list --json | tr -d ' \n')" = "[]" ] || fail "an overflowed backup is listed"
[ -n "$(snapshot_lvs mysnapsrc)" ] && fail "snapshot LVs left after the overflow: $(snapshot_lvs mysnapsrc)"
grep -q "$D/state-db1-overflow/mnt" /proc/self/mountinfo && fail "a snapshot mount is left after the overflow"
rm -f "$D/srcmnt/ballast"

step "max_hold: a snapshot command that hangs under the lock is cut off, writers go on"
sed 's/^name = "db1"/name = "db1-hold"/; s#state-db1#state-db1-hold#; s/^lock_retries = 3/lock_retries = 3\nmax_hold = "8s"/' "$D/src.toml" >"$D/hold.toml"
grep -q '^max_hold = "8s"' "$D/hold.toml" || fail "hold.toml has no max_hold"
# An lvcreate that makes the snapshot and then hangs (as one waiting for udev
# would): the killed command's snapshot must be found and removed. (A shared
# flock on the VG's lock file did not make lvcreate wait in this VM.)
REAL_LVCREATE=$(command -v lvcreate)
mkdir -p "$D/hang"
printf '#!/bin/sh\n%s "$@" || exit $?\nexec sleep 60\n' "$REAL_LVCREATE" >"$D/hang/lvcreate"
chmod 755 "$D/hang/lvcreate"
sql src "CREATE TABLE IF NOT EXISTS sbtest.ticks (id INT AUTO_INCREMENT PRIMARY KEY)"
# A writer: the time of every commit.
( while [ ! -e "$RUN/ticks.stop" ]; do sql src "INSERT INTO sbtest.ticks VALUES ()" && date +%s.%N; done ) >"$RUN/ticks" 2>"$RUN/ticks.err" &
WRITER=$!
sleep 1
T0=$(date +%s.%N)
rc=0; PATH="$D/hang:$PATH" snapshotter --config "$D/hold.toml" >"$RUN/hold.out" 2>"$RUN/hold.log" || rc=$?
metric max_hold_run_secs "$(elapsed "$T0")"
sleep 1
touch "$RUN/ticks.stop"
wait $WRITER || true
cat "$RUN/hold.log"
[ $rc = 3 ] || fail "the snapshotter exited $rc, not 3, with lvcreate hanging"
grep -q "lvcreate -s.*mysql.max_hold" "$RUN/hold.log" || fail "the error does not name lvcreate and mysql.max_hold"
[ -s "$RUN/hold.out" ] && fail "a manifest was printed: $(cat "$RUN/hold.out")"
stall=$(awk 'NR > 1 && $1 - p > m { m = $1 - p } { p = $1 } END { printf "%.2f", m }' "$RUN/ticks")
metric max_hold_writer_stall_secs "$stall"
awk -v s="$stall" 'BEGIN { exit !(s < 12) }' || fail "a writer stalled ${stall}s (max_hold 8s)"
[ -n "$(snapshot_lvs mysnapsrc)" ] && fail "snapshot LVs left after max_hold: $(snapshot_lvs mysnapsrc)"
ls "$D/state-db1-hold" | grep -q '^[0-9]\{8\}T' && fail "pending state left: $(ls "$D/state-db1-hold")"

step "done"
echo PASS >"$OUT/result"
echo "VM TEST PASSED"
