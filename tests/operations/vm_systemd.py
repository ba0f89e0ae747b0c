"""Boot the cgroup v2 VM with systemd as PID 1 and run contrib/systemd/trio-jobs.service in it.

Theory of operation. The VM of tests/vm (docs/testing-vm.md) normally runs busybox as PID 1
and pytest chrooted in an overlay of the host's root. The host's root has systemd (the
Debian package: /lib/systemd/systemd), so the same kernel and the same overlay can boot
systemd instead: this module's own /init (busybox) loads the modules, builds the overlay
exactly as tests/vm/init.sh does, installs into it (on the overlay's tmpfs, never on the
host) the unit file *unchanged*, a symlink ``/opt/trio-jobs/bin/trio-jobs`` to this
checkout's entry point, and a check service, and then ``switch_root``s to systemd with
``systemd.unit=trio-jobs-vm.target`` (basic.target plus the check: no getty, nothing of
the host's multi-user.target).

The check (:data:`CHECK_SCRIPT`, a oneshot service whose Success/FailureAction powers the
guest off) drives the unit as an operator would: ``systemctl start`` (Type=notify: it
returns after READY=1), a job as admin and one as alice (a dynamic user) in their cgroups
under the unit's delegated subtree, a job OOM-killed by its own memory.max (the service must
stay active: OOMPolicy=continue), a rotated server certificate and ``systemctl reload``
(the journal has the "reloaded" line, the jobs still run), ``systemctl stop`` (clean exit
within TimeoutStopSec, no job process and no job cgroup left), and a restart that reports
the jobs as killed by the shutdown. It prints what it sees; its exit status is the verdict.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from vm.harness import SCRATCH_BYTES, build_initramfs, qemu_command

if TYPE_CHECKING:
    from vm.assets import Assets

REPO: Final = Path(__file__).resolve().parents[2]
UNIT_FILE: Final = REPO / "contrib" / "systemd" / "trio-jobs.service"
SYSTEMD: Final = Path("/lib/systemd/systemd")
DEFAULT_TIMEOUT: Final = 900.0
MAX_TAIL: Final = 256 * 1024

INIT_SCRIPT: Final = r"""#!/bin/busybox sh
# PID 1 until systemd: modules, the overlay root (as tests/vm/init.sh), install, switch_root.
/bin/busybox --install -s /bin
export PATH=/bin
R=/newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {
    echo "vm-init: $*" >/dev/console
    [ -d /results ] && echo "init: $*" >/results/status
    sync; poweroff -f; echo o >/proc/sysrq-trigger
}
for m in /modules/*.ko; do insmod "$m" || fail "insmod $m"; done
mkdir -p /host /rw /results "$R"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /host || fail "9p hostroot"
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=262144 results /results || fail "9p results"
mount -t tmpfs -o mode=0755 rw /rw || fail "tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay "$R" || fail "overlay"
mkdir -p "$R/mnt/vm-results" || fail "mkdir"
mount --move /results "$R/mnt/vm-results" || fail "move results"
/bin/sh "$R/mnt/vm-results/install.sh" "$R" || fail "install.sh"
[ -x "$R/lib/systemd/systemd" ] || fail "no /lib/systemd/systemd in the host root"
cut -d' ' -f1 /proc/uptime >"$R/mnt/vm-results/ready_uptime"
umount /proc /sys /dev 2>/dev/null
exec switch_root "$R" /lib/systemd/systemd systemd.unit=trio-jobs-vm.target
fail "switch_root failed"
"""

INSTALL_SCRIPT: Final = """#!/bin/sh
# Runs in the initramfs with the overlay root at $1: everything written lands on its tmpfs.
set -e
R=$1
S=$R/mnt/vm-results
mkdir -p "$R/etc/systemd/system/trio-jobs.service.d" "$R/opt/trio-jobs/bin"
cp "$S/trio-jobs.service" "$R/etc/systemd/system/trio-jobs.service"
# Python is ~20x slower under TCG: give the first start (PKI creation) room. VM only.
printf '[Service]\\nTimeoutStartSec=600\\n' >"$R/etc/systemd/system/trio-jobs.service.d/vm.conf"
ln -sf {entry_point} "$R/opt/trio-jobs/bin/trio-jobs"
# The checkout under test may live in /tmp (CI clones there), which systemd-tmpfiles empties
# at boot (tmp.conf: "D /tmp"); keep it: create /tmp, never clean it. VM only.
mkdir -p "$R/etc/tmpfiles.d"
printf 'd /tmp 1777 root root -\n' >"$R/etc/tmpfiles.d/tmp.conf"
cp "$S/trio-jobs-vm.target" "$S/trio-jobs-vm-check.service" "$R/etc/systemd/system/"
"""

TARGET_UNIT: Final = """[Unit]
Description=trio-jobs VM check (basic.target and the check only)
Requires=basic.target trio-jobs-vm-check.service
After=basic.target
AllowIsolate=yes
"""

CHECK_UNIT: Final = """[Unit]
Description=Drive trio-jobs.service as an operator would
After=basic.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/sh -c '/bin/sh /mnt/vm-results/check.sh; s=$$?; echo $$s >/mnt/vm-results/status; exit $$s'
StandardOutput=append:/mnt/vm-results/output.txt
StandardError=inherit
TimeoutStartSec=infinity
"""

CHECK_SCRIPT: Final = r"""#!/bin/sh
set -u
export TRIO_JOBS_HOME=/var/lib/trio-jobs PATH=/opt/trio-jobs/bin:/usr/sbin:/usr/bin:/sbin:/bin
U=/sys/fs/cgroup/system.slice/trio-jobs.service
fail() {
    echo "FAIL: $*"
    systemctl status --no-pager trio-jobs 2>&1 | head -20
    journalctl -u trio-jobs --no-pager 2>&1 | tail -40
    exit 1
}
step() { echo; echo "== $* ($(cut -d' ' -f1 /proc/uptime) s)"; }

step "systemd $(systemctl --version | head -1), PID 1 is $(cat /proc/1/comm)"
step "systemctl start trio-jobs (Type=notify: returns after READY=1)"
t0=$(date +%s)
systemctl start trio-jobs || fail "systemctl start"
echo "started in $(( $(date +%s) - t0 )) s"
systemctl show -p Type,ActiveState,SubState,NotifyAccess,Delegate,DelegateControllers trio-jobs
[ "$(systemctl show -P SubState trio-jobs)" = running ] || fail "not running"
echo "server cgroup: $(cat /proc/$(systemctl show -P MainPID trio-jobs)/cgroup)"
echo "unit subtree_control: $(cat $U/cgroup.subtree_control)"
grep -qx "$(systemctl show -P MainPID trio-jobs)" $U/supervisor/cgroup.procs \
    || fail "the server is not in the supervisor leaf"

step "a job as admin and one as alice (dynamic user)"
J=$(trio-jobs start -- sleep 600) || fail "start as admin"
A=$(TRIO_JOBS_IDENTITY=alice trio-jobs start -- sleep 600) || fail "start as alice"
ps -o user:20,pid,args -C sleep
# Job cgroups are not named after job ids (nothing world-readable may list them): find each
# job's process instead and check where it lives.
n=0
for pid in $(pgrep -x sleep); do
    cg=$(sed -n 's/^0:://p' /proc/$pid/cgroup)
    case $cg in
        /system.slice/trio-jobs.service/trio-jobs-*/*) ;;
        *) fail "job process $pid is in $cg, not in a job cgroup under the unit" ;;
    esac
    echo "job process $pid: cgroup $cg, memory.max $(cat /sys/fs/cgroup$cg/memory.max)"
    n=$((n + 1))
done
[ $n = 2 ] || fail "expected 2 job processes, found $n"
systemd-cgls --no-pager -u trio-jobs

step "a job OOM-killed by its own memory.max: the service stays (OOMPolicy=continue)"
O=$(TRIO_JOBS_IDENTITY=alice trio-jobs start --memory 32M -- tail /dev/zero) || fail "start oom job"
trio-jobs tail "$O"; echo "tail exit $?"
trio-jobs status "$O" | grep -i "out of memory" || fail "job $O was not OOM-killed"
sleep 1  # systemd reads memory.events on its own inotify wake-up: let it see the kill
[ "$(systemctl is-active trio-jobs)" = active ] || fail "an OOM kill in a job stopped the service"

step "rotate the server certificate, systemctl reload"
old=$(openssl x509 -noout -serial -in $TRIO_JOBS_HOME/pki/server.crt 2>/dev/null)
trio-jobs certs issue --server --force --dir $TRIO_JOBS_HOME/pki >/dev/null || fail "issue"
echo "serial: $old -> $(openssl x509 -noout -serial -in $TRIO_JOBS_HOME/pki/server.crt 2>/dev/null)"
systemctl reload trio-jobs || fail "systemctl reload"
# systemd 252 returns once ExecReload's kill has run; the server's "reloaded" line follows.
for _ in $(seq 60); do
    journalctl -u trio-jobs --no-pager -o cat | grep "reloaded:" && break
    sleep 1
done || true
journalctl -u trio-jobs --no-pager -o cat | grep -q "reloaded:" || fail "no 'reloaded' line in the journal"

step "a reload with a missing key fails, logged at priority warning (our <4> prefix)"
mv $TRIO_JOBS_HOME/pki/server.key $TRIO_JOBS_HOME/pki/server.key.away
systemctl reload trio-jobs || fail "systemctl reload"
for _ in $(seq 60); do
    journalctl -u trio-jobs --no-pager -o cat -p warning | grep "reload failed" && break
    sleep 1
done || true
journalctl -u trio-jobs --no-pager -o cat -p warning | grep -q "reload failed" || fail "no 'reload failed' warning"
mv $TRIO_JOBS_HOME/pki/server.key.away $TRIO_JOBS_HOME/pki/server.key
trio-jobs status "$J" | grep -q running || fail "the server does not answer after a failed reload"
trio-jobs status "$J" | grep -q running || fail "job $J stopped by the reload"
[ "$(systemctl show -P MainPID trio-jobs)" != 0 ] || fail "no main pid after reload"
trio-jobs list --all

step "systemctl stop trio-jobs (KillMode=mixed: the server stops its jobs)"
t0=$(date +%s)
systemctl stop trio-jobs || fail "systemctl stop"
echo "stopped in $(( $(date +%s) - t0 )) s"
systemctl show -p Result,ExecMainCode,ExecMainStatus trio-jobs
[ "$(systemctl show -P Result trio-jobs)" = success ] || fail "the stop was not clean"
pgrep -a sleep && fail "a job process survived the stop"
# systemd trims the unit's cgroup after the stop, so an empty tree alone would not show
# that the server removed its job cgroups: its log would say if it could not.
if [ -d $U ]; then
    left=$(find $U -mindepth 1 -type d)
    [ -z "$left" ] || fail "cgroups left: $left"
fi
journalctl -u trio-jobs --no-pager -o cat -p warning | grep -i "cgroup" | grep -v "later" && fail "a cgroup problem"
echo "no job process, no job cgroup left"

step "start again: the jobs are recorded as stopped by the shutdown"
systemctl start trio-jobs || fail "second start"
s=$(trio-jobs status "$J"); echo "$s"
echo "$s" | grep -q "server shutdown" || fail "job $J not ended by the shutdown"
systemctl stop trio-jobs || fail "second stop"
journalctl -u trio-jobs --no-pager -o cat | tail -12
step "ALL OK"
"""


@dataclass(frozen=True, kw_only=True)
class SystemdRun:
    status: int | None  # the check's exit status; None if it reported none
    failure: str | None
    output: str
    console: str
    ready_seconds: float | None  # guest uptime when systemd was started
    wall_seconds: float

    @property
    def ok(self) -> bool:
        return self.status == 0

    def report(self) -> str:
        what = f"check exit status {self.status}" if self.failure is None else self.failure
        return (
            f"systemd VM: {what} ({self.wall_seconds:.0f} s in all)\n"
            f"----- check output -----\n{self.output}\n----- console (tail) -----\n{self.console}"
        )


def entry_point() -> Path:
    """This checkout's ``trio-jobs`` (beside the interpreter running the tests)."""
    return Path(sys.executable).parent / "trio-jobs"


def run_systemd_check(assets: Assets, *, timeout: float = DEFAULT_TIMEOUT) -> SystemdRun:
    tmp = Path(tempfile.mkdtemp(prefix="trio-jobs-vm-systemd-"))
    try:
        results = tmp / "results"
        results.mkdir()
        initrd = tmp / "initramfs.cpio"
        initrd.write_bytes(build_initramfs(assets, INIT_SCRIPT.encode()))
        scratch = tmp / "scratch.img"
        with scratch.open("wb") as f:
            f.truncate(SCRATCH_BYTES)
        console = tmp / "console.log"
        files = {
            "install.sh": INSTALL_SCRIPT.replace("{entry_point}", shlex.quote(str(entry_point()))),
            "trio-jobs.service": UNIT_FILE.read_text(),
            "trio-jobs-vm.target": TARGET_UNIT,
            "trio-jobs-vm-check.service": CHECK_UNIT,
            "check.sh": CHECK_SCRIPT,
        }
        for name, text in files.items():
            (results / name).write_text(text)
        cmd = qemu_command(assets, initrd=initrd, results=results, scratch=scratch, console=console)
        cmd[cmd.index("-append") + 1] = "console=ttyS0 panic=-1 loglevel=4 mitigations=off systemd.show_status=1"
        start = time.monotonic()
        failure: str | None = None
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            failure = f"timed out after {timeout:g} s (qemu killed)"
            proc.kill()
            out, _ = proc.communicate()
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
        wall = time.monotonic() - start
        status_text = _tail(results / "status").strip()
        status = int(status_text) if status_text.isdigit() else None
        if status is None and failure is None:
            failure = status_text or f"the guest reported no status (qemu exit {proc.returncode})"
        ready = _tail(results / "ready_uptime").strip()
        return SystemdRun(
            status=status,
            failure=failure,
            output=_tail(results / "output.txt"),
            console=_tail(console)[-16384:] + ("\n[qemu] " + out.decode(errors="replace")[-2048:] if out else ""),
            ready_seconds=float(ready) if ready.replace(".", "", 1).isdigit() else None,
            wall_seconds=wall,
        )
    finally:
        if os.environ.get("TRIO_JOBS_VM_KEEP") == "1":
            print(f"vm: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    return data[-MAX_TAIL:].decode(errors="replace")
