"""A fail-closed sandbox for running untrusted Python programs (the code-execution reward).

Standard library only: this file is also the launcher script, run as `python -I -S sandbox.py` with a JSON
job on stdin. The launcher (root) builds the isolation, then forks the program, which runs as an unprivileged
uid. Isolation, when `isolate` is on (the default; every step must succeed or nothing runs):
- new network namespace (no interfaces up: no loopback, no outside network),
- new PID namespace: the program is PID 1 there, cannot see or signal the trainer, and killing it kills every
  process it started (the kernel tears the namespace down),
- new mount + IPC namespaces: a fresh size-limited tmpfs on /tmp, /var/tmp and /dev/shm (the work directory
  lives there and vanishes with the namespace); the trainer's working directory and $HOME (and any `hide`
  path) are covered by empty tmpfs mounts; a fresh /proc shows only the namespace's processes,
- an unprivileged uid per concurrent slot (so RLIMIT_NPROC, which root ignores and which counts per uid,
  bounds each run separately), no supplementary groups, no_new_privs (setuid binaries cannot escalate),
- rlimits: CPU seconds, address space, file size, process count, open files, no core dumps,
- an empty environment, stdin from a file, stdout/stderr to files the launcher reads back (bounded by the
  file-size limit), a wall-clock deadline after which the namespace's PID 1 is SIGKILLed; if the launcher
  itself dies the program gets SIGKILL (PDEATHSIG),
- a seccomp filter (libseccomp): no user namespaces (unshare/clone with CLONE_NEWUSER fail with EPERM),
- the program runs at nice +10, so a CPU-saturating program cannot starve the launcher enforcing the deadline.
Not protected: world-readable files outside the hidden paths (system files, other users' readable data),
CPU/memory bandwidth contention with the trainer, kernel exploits. See docs/rewards.md.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 8192, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
CLONE_NEWUSER = 0x10000000
# libseccomp's constants (seccomp.h): default action, errno action, the masked-equal comparison.
SCMP_ACT_ALLOW, SCMP_ACT_ERRNO, SCMP_CMP_MASKED_EQ = 0x7FFF0000, 0x00050000, 7
EPERM, ENOSYS = 1, 38
# The program runs this much nicer than the launcher, so a program that saturates the CPU (a fork bomb up to
# the process limit) cannot starve the launcher that enforces its wall deadline.
PROGRAM_NICE = 10
ISOLATION_FAILED = "isolation_failed"
UID_BASE = 200_000  # uids without a passwd entry: nothing on the host belongs to them


class SandboxUnavailable(RuntimeError):
    """Isolation could not be set up; the code reward refuses to run (unless `allow_unisolated=True`)."""


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 2
    wall_s: float = 5.0
    memory_mb: int = 256
    file_mb: int = 8
    nproc: int = 16
    tmpfs_mb: int = 32
    max_output: int = 65536


@dataclass
class RunResult:
    status: str  # "ok" (exited), "timeout" (wall deadline), "isolation_failed", "launcher_error"
    returncode: int | None
    stdout: str
    stderr: str
    detail: str = ""


# ----------------------------------------------------------------------------------------------------------
# Trainer side
# ----------------------------------------------------------------------------------------------------------

_SLOTS: queue.Queue[int] = queue.Queue()
_SLOT_LOCK = threading.Lock()
_slot_count = 0


def _take_slot() -> int:
    # A distinct uid per concurrent run, offset by our pid so two trainer processes rarely share one.
    global _slot_count
    try:
        return _SLOTS.get_nowait()
    except queue.Empty:
        with _SLOT_LOCK:
            _slot_count += 1
            return _slot_count


def default_hide() -> list[str]:
    """Paths covered inside the sandbox: the trainer's working directory and home."""
    return [p for p in {os.getcwd(), os.path.expanduser("~")} if p and p != "/"]


def run_program(
    code: str,
    stdin: str = "",
    *,
    limits: Limits = Limits(),
    isolate: bool = True,
    hide: list[str] | None = None,
) -> RunResult:
    """Run `code` (Python source) with `stdin` in the sandbox; blocks until it ends or its deadline passes."""
    slot = _take_slot()
    try:
        job = {
            "code": code,
            "stdin": stdin,
            "limits": limits.__dict__,
            "isolate": isolate,
            "uid": UID_BASE + (os.getpid() % 4096) * 64 + slot,
            "hide": default_hide() if hide is None else list(hide),
            "python": os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
            "prefix": os.path.realpath(sys.base_prefix),
        }
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd="/", env={}, start_new_session=True,
        )
        try:
            out, err = proc.communicate(json.dumps(job).encode(), timeout=limits.wall_s + 15)
        except subprocess.TimeoutExpired:
            # Backstop: the launcher enforces the deadline itself; if it hangs, kill it (PDEATHSIG takes the
            # program and therefore its whole PID namespace with it).
            os.killpg(proc.pid, 9)
            proc.communicate()
            return RunResult("timeout", None, "", "", "launcher did not return")
        try:
            report = json.loads(out.decode() or "{}")
            return RunResult(**report)
        except (ValueError, TypeError):
            tail = err.decode(errors="replace")[-500:]
            return RunResult("launcher_error", proc.returncode, "", "", f"launcher failed: {tail}")
    finally:
        _SLOTS.put(slot)


# ----------------------------------------------------------------------------------------------------------
# Launcher side (runs in its own process, as root when isolating)
# ----------------------------------------------------------------------------------------------------------


def outermost(paths: list[str]) -> list[str]:
    """Drop "/" and paths inside another listed path (covering the outer one already hides them; mounting
    on the inner one would fail once the outer one is covered).

    >>> outermost(["/root/project", "/root", "/srv/data", "/", "/srv/data"])
    ['/root', '/srv/data']
    """
    norm = sorted({os.path.normpath(p) for p in paths} - {"/"})
    return [p for p in norm if not any(p.startswith(q + "/") for q in norm if q != p)]


def _ancestors(path: str) -> list[str]:
    """Proper ancestors of an absolute path, outermost first, without "/".

    >>> _ancestors("/a/b/c")
    ['/a', '/a/b']
    """
    parts = os.path.normpath(path).strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def check(ret: int, what: str) -> None:
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        enc = (lambda s: s.encode() if s is not None else None)
        check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")

    def unshare(flags: int) -> None:
        check(libc.unshare(flags), "unshare")

    def prctl(option: int, arg: int) -> None:
        check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")

    return mount, unshare, prctl


def _deny_user_namespaces() -> None:
    """A seccomp filter that makes unshare/clone with CLONE_NEWUSER fail with EPERM and clone3 with ENOSYS
    (its flags sit in a struct a filter cannot read; glibc then falls back to clone, which is checked).
    A user namespace would hand the program a full capability set over fresh namespaces: kernel attack
    surface the sandbox does not need. Built by libseccomp (the C library, present wherever systemd is)
    through ctypes: this launcher runs with -I -S, without site-packages, so no Python binding is importable."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise OSError(f"libseccomp not found ({e}); install libseccomp2") from None

    class ArgCmp(ctypes.Structure):  # struct scmp_arg_cmp
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                    ("datum_b", ctypes.c_uint64)]

    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        newuser = (ArgCmp * 1)(ArgCmp(0, SCMP_CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
        rules = [("unshare", SCMP_ACT_ERRNO | EPERM, newuser), ("clone", SCMP_ACT_ERRNO | EPERM, newuser),
                 ("clone3", SCMP_ACT_ERRNO | ENOSYS, None)]
        for syscall, action, cmp in rules:
            nr = lib.seccomp_syscall_resolve_name(syscall.encode())
            if nr < 0:
                continue  # not a syscall of this architecture (clone3 on old kernels' headers)
            ret = lib.seccomp_rule_add_array(ctypes.c_void_p(ctx), action, nr, 1 if cmp else 0, cmp)
            if ret < 0:
                raise OSError(f"seccomp rule for {syscall}: {os.strerror(-ret)}")
        ret = lib.seccomp_load(ctypes.c_void_p(ctx))
        if ret < 0:
            raise OSError(f"seccomp_load: {os.strerror(-ret)}")
    finally:
        lib.seccomp_release(ctypes.c_void_p(ctx))


def _reap_descendants(signal_mod) -> None:
    """Kill and reap every process left under this launcher (a child subreaper: orphans of the program,
    also those that left its session with setsid, are reparented here), until none is left."""
    me = str(os.getpid())
    while True:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", "rb") as f:
                        stat = f.read().decode(errors="replace")
                except OSError:
                    continue
                if stat[stat.rfind(")") + 2:].split()[1] == me:  # field 4, ppid, after "pid (comm) state"
                    found.append(int(entry))
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal_mod.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in found:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _build_namespace(job: dict, mount, unshare) -> str:
    """New namespaces and mounts; returns the work directory (inside the fresh /tmp)."""
    lim = job["limits"]
    unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={lim['tmpfs_mb']}m,mode=1777")
    for extra in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(extra):
            mount("tmpfs", extra, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=1m,mode=1777")
    # Hide the trainer's files. The interpreter may live under a hidden path (e.g. ~/.pyenv): park it on
    # a bind mount first and move it back inside the empty tmpfs.
    prefix = job["prefix"]
    # An ancestor of the interpreter that others cannot enter (e.g. /root, 0700) is covered too: the
    # sandbox uid could not read it anyway, and the interpreter is moved back in below.
    closed = [a for a in _ancestors(prefix) if not os.stat(a).st_mode & 0o001]
    # Paths on the fresh tmpfs mounts above are already empty: covering them again would also bury the
    # parked interpreter (/tmp/.prefix).
    fresh = ("/tmp", "/var/tmp", "/dev/shm")
    covered = [h for h in outermost([h for h in [*job["hide"], *closed[:1]] if os.path.isdir(h)])
               if not any(h == f or h.startswith(f + "/") for f in fresh)]
    parked = "/tmp/.prefix"
    needs_prefix = any(prefix == h or prefix.startswith(h.rstrip("/") + "/") for h in covered)
    if needs_prefix:
        os.mkdir(parked, 0o755)
        mount(prefix, parked, None, MS_BIND | MS_REC)
    for h in sorted(covered, key=len):
        mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    if needs_prefix:
        os.makedirs(prefix, 0o755, exist_ok=True)
        mount(parked, prefix, None, MS_MOVE)
        os.rmdir(parked)
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    os.chown(work, job["uid"], job["uid"])
    return work


def _exec_program(job: dict, work: str, io_fds: tuple[int, int, int], mount, prctl, report_fd: int) -> None:
    """In the forked child: finish isolating, drop privileges, exec the program. Never returns. `report_fd`
    (close-on-exec) stays open until the exec, for the caller to report a failure before it."""
    import resource

    lim, isolate, uid = job["limits"], job["isolate"], job["uid"]
    if isolate:
        # PID 1 of the new namespace: a /proc that shows only this namespace.
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    else:
        os.setsid()
    for fd, target in zip(io_fds, (0, 1, 2)):
        os.dup2(fd, target)
    os.closerange(3, report_fd)
    os.closerange(report_fd + 1, 65536)
    os.chdir(work)
    mb = 1024 * 1024
    for res, value in (
        (resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
        (resource.RLIMIT_AS, (lim["memory_mb"] * mb,) * 2),
        (resource.RLIMIT_FSIZE, (lim["file_mb"] * mb,) * 2),
        (resource.RLIMIT_NPROC, (lim["nproc"],) * 2),
        (resource.RLIMIT_NOFILE, (64, 64)),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(res, value)
    if isolate:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise OSError("could not drop privileges")
    prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries cannot escalate; lets an unprivileged process load seccomp
    try:
        _deny_user_namespaces()
    except OSError:
        if isolate:
            raise  # fail closed; the unisolated opt-out runs without the filter where libseccomp is missing
    os.nice(PROGRAM_NICE)
    prctl(PR_SET_PDEATHSIG, 9)  # after setuid: a credential change clears it
    os.execve(job["python"], [job["python"], "-I", "main.py"], {})


def _launch(job: dict) -> dict:
    import signal
    import time

    lim, isolate = job["limits"], job["isolate"]
    os.umask(0o022)  # the directories we create must be traversable by the sandbox uid
    mount, unshare, prctl = _libc()
    try:
        if isolate:
            if os.geteuid() != 0:
                raise OSError("not root: cannot create namespaces or switch to an unprivileged uid")
            work = _build_namespace(job, mount, unshare)
        else:
            work = tempfile.mkdtemp(prefix="gspo_sandbox_")
    except OSError as e:
        return {"status": ISOLATION_FAILED, "returncode": None, "stdout": "", "stderr": "", "detail": str(e)}
    with open(os.path.join(work, "main.py"), "w") as f:
        f.write(job["code"])
    io_dir = tempfile.mkdtemp(dir="/tmp" if isolate else None)  # root-owned 0700: the program cannot reach it
    paths = [os.path.join(io_dir, n) for n in ("stdin", "stdout", "stderr")]
    with open(paths[0], "w") as f:
        f.write(job["stdin"])
    if isolate:
        os.chown(os.path.join(work, "main.py"), job["uid"], job["uid"])
    fds = (os.open(paths[0], os.O_RDONLY), *(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600) for p in paths[1:]))
    # A failure before the exec is reported through a close-on-exec pipe, which the program can never
    # write to: it cannot fake "isolation failed" (and so fail the whole batch) by printing that and exiting.
    report_r, report_w = os.pipe()  # O_CLOEXEC
    if not isolate:  # orphans of the program come back here, to be killed with it (no PID namespace to do it)
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    # The wall deadline counts from the fork: the program's set-up time is part of its budget.
    deadline = time.monotonic() + lim["wall_s"]
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        try:
            _exec_program(job, work, fds, mount, prctl, report_w)
        except BaseException as e:  # noqa: BLE001 - report and die; never run unisolated
            os.write(report_w, f"{e}".encode(errors="replace")[:4000])
        os._exit(97)
    os.close(report_w)
    import select

    ready, _, _ = select.select([report_r], [], [], max(0.0, deadline - time.monotonic()))
    setup_error = os.read(report_r, 4096).decode(errors="replace") if ready else ""  # "" = EOF: exec happened
    os.close(report_r)
    if setup_error:
        os.waitpid(pid, 0)
        return {"status": ISOLATION_FAILED, "returncode": None, "stdout": "", "stderr": "",
                "detail": f"{ISOLATION_FAILED}: {setup_error}"}
    status, timed_out = None, False
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif time.monotonic() > deadline:
            # PID 1 of the namespace: the kernel kills every process in it. Unisolated: its session.
            try:
                os.kill(pid, signal.SIGKILL) if isolate else os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            status, timed_out = os.waitpid(pid, 0)[1], True
        else:
            time.sleep(0.005)
    if not isolate:
        _reap_descendants(signal)  # what it started and left running, in its session or out of it
    def read(path: str) -> str:
        with open(path, "rb") as f:
            return f.read(lim["max_output"]).decode(errors="replace")

    out, err = read(paths[1]), read(paths[2])
    code = os.waitstatus_to_exitcode(status)
    if not isolate:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(io_dir, ignore_errors=True)
    return {"status": "timeout" if timed_out else "ok", "returncode": code, "stdout": out, "stderr": err}


if __name__ == "__main__":
    report = _launch(json.loads(sys.stdin.read()))
    sys.stdout.write(json.dumps(report))
