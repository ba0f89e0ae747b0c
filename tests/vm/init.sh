#!/bin/busybox sh
# PID 1 of the cgroup v2 test VM (runs from the initramfs that tests/vm/harness.py builds).
#
# 1. load the modules (/modules/NN-*.ko, already in dependency order), mount the host root
#    (9p tag "hostroot", read-only) and the writable results share (9p tag "results");
# 2. make a writable root: an overlay of the host root with a tmpfs upper layer, so pytest can
#    write its tmp dirs, __pycache__ and caches while the host's files (the repository, the
#    venv, /tmp) stay visible and the host is never written;
# 3. mount proc/sys/dev and cgroup2 (nsdelegate) with +cpu +memory +io +pids enabled in the
#    root's subtree_control; format the virtio scratch disk (254:0) and mount it;
# 4. run results/job.sh (written by the host) chrooted, stdin /dev/null, output to
#    results/output.txt, its exit status to results/status; then power off.
# Any failure before the job writes "init: <what>" to results/status (when it can) and the
# console, and powers off: the host reports it instead of waiting for its timeout.

/bin/busybox --install -s /bin
export PATH=/bin
R=/newroot
OUT=$R/mnt/vm-results

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
stty -onlcr </dev/console 2>/dev/null

halt_now() {
    sync
    poweroff -f
    echo o >/proc/sysrq-trigger
    reboot -f  # qemu runs with -no-reboot: a reset ends it too
}

fail() {
    echo "vm-init: $*" >/dev/console
    if [ -d "$OUT" ] && [ -w "$OUT" ]; then echo "init: $*" >"$OUT/status"; fi
    if [ -d /results ] && [ -w /results ]; then echo "init: $*" >/results/status; fi
    halt_now
}

for m in /modules/*.ko; do
    insmod "$m" || fail "insmod $m failed"
done

mkdir -p /host /rw /results "$R"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /host \
    || fail "cannot mount the host root (9p tag hostroot)"
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=262144 results /results \
    || fail "cannot mount the results share (9p tag results)"
mount -t tmpfs -o mode=0755 rw /rw || fail "tmpfs for the overlay"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay "$R" \
    || fail "overlay of the host root failed"
mkdir -p "$OUT" "$R/mnt/scratch" "$R/proc" "$R/sys" "$R/dev" "$R/tmp" || fail "mkdir in the new root"
mount --move /results "$OUT" || fail "move the results share"

mount -t proc proc "$R/proc" || fail "proc"
mount -t sysfs sysfs "$R/sys" || fail "sysfs"
mount -t devtmpfs devtmpfs "$R/dev" || fail "devtmpfs"
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts devpts "$R/dev/pts" || fail "devpts"
mount -t tmpfs -o mode=1777 shm "$R/dev/shm" || fail "/dev/shm"
chmod 1777 "$R/tmp"
mount -t cgroup2 -o nsdelegate cgroup2 "$R/sys/fs/cgroup" || fail "cannot mount cgroup2"
echo "+cpu +memory +io +pids" >"$R/sys/fs/cgroup/cgroup.subtree_control" \
    || fail "cannot enable +cpu +memory +io +pids in the root cgroup"
if [ -b /dev/vda ]; then
    mke2fs -q /dev/vda >/dev/null 2>&1 || fail "mke2fs /dev/vda"
    mount -t ext4 /dev/vda "$R/mnt/scratch" || fail "mount the scratch disk"
    chmod 1777 "$R/mnt/scratch"
fi
ip link set lo up 2>/dev/null

[ -f "$OUT/job.sh" ] || fail "no job.sh in the results share"
cut -d' ' -f1 /proc/uptime >"$OUT/ready_uptime"
chroot "$R" /bin/sh /mnt/vm-results/job.sh </dev/null >"$OUT/output.txt" 2>&1
echo "$?" >"$OUT/status"
halt_now
