"""A sandbox for running untrusted Python (programs a policy wrote) to score them: ``run_sandboxed``.

Two processes of ours stand between the caller and the program: the caller starts a *supervisor* (this file, run as a
script) in a new session, and the supervisor forks the program. The supervisor is trusted code; it enforces the
wall-clock deadline itself, reads the program's output with a cap, kills every descendant and reports one JSON line.

Layers (docs/verifiers.md has what each attack meets):

- *namespace* isolation (``unshare(2)`` through ctypes: Python 3.11 has no ``os.unshare``; detected once with a
  probe run): new user, network, mount and pid namespaces. The network namespace has only a downed loopback: no
  network at all. The supervisor's child is the pid namespace's init; when it exits the kernel kills every process
  left, including ones that called setsid. A fresh /proc shows no process outside. Every mount is read-only, nosuid
  and nodev, /dev holds only null/zero/full/random/urandom, the scratch directory is a size-limited tmpfs, and the
  caller's HOME, the temp root, /run, /root and /home are covered by empty tmpfs (the interpreter's own
  directories bound back in). The program runs with no capabilities and no_new_privs, so it cannot undo any of
  that. A caller running as root gets the program mapped to the host's ``nobody`` (65534): RLIMIT_NPROC never binds
  uid 0.
- *socket* fallback (``network_isolation == "socket-blocked"``), where namespaces do not work: a Python audit hook
  installed before the program refuses sockets, process creation, native code (ctypes), subinterpreters, writes
  outside the scratch directory, reads of what namespace mode hides (the caller's HOME, the temp root, /run, /root,
  /home, files other users cannot read), other processes' /proc entries, signals to and resource limits of other
  processes; the calls that reach other processes without an audit event (``pidfd_open``, ``pidfd_send_signal``,
  ``setpriority``, ``sched_set*``, ``fork_exec``) are replaced by refusals. The hook is a Python-level guard, not a
  kernel boundary (its path checks race with the program's threads, and a program that inspects the guard can undo
  it), so where the kernel has Landlock (``filesystem == "landlock"``, Linux 5.13+) a Landlock ruleset enforces the
  same file rules in the kernel, and from ABI 4 / 6 on also refuses TCP and signals to any process outside the
  program. A root caller's program runs as the host's ``nobody`` where that user can reach the interpreter (else
  it keeps uid 0 without capabilities, and ``notes`` says so): then the kernel refuses its signals, rlimit and
  priority changes to root's processes and root's private files.
- both: resource limits in the program's process (RLIMIT_CPU, AS, FSIZE, NPROC, NOFILE, CORE=0), a scrubbed
  environment (nothing of the caller's), stdin from /dev/null, a fresh scratch directory as cwd, HOME and TMPDIR
  (removed afterwards), ``python -s -S -B -P``, output captured head + tail up to a cap, every wait with a
  deadline, and an OOM score of 1000 (under memory pressure the kernel kills the sandbox, not the trainer). The
  program's other processes still running when it ends are counted (``leftover_processes``) and killed; if the
  supervisor itself fails it kills the program's group first, and the caller always kills what is left of the
  supervisor's session. A sandbox failure after the program started is reported with ``started=True`` (the code
  verifier scores it 0.0: breaking the sandbox must not dodge a 0).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

SUPERVISOR_GRACE_S = 10.0  # the caller's deadline = the program's + this (start-up, the sweep, the report)
EXIT_GRACE_S = 0.2  # after the program exits, how long its output pipes may stay open (held by a descendant)
SWEEP_S = 2.0  # the longest the supervisor spends killing leftover processes
RECOUNT_S = 0.05  # leftovers are counted again after this pause: a process in the middle of exiting is no leftover
RUNNING = "the program is running"  # the line the supervisor writes to the caller once the program's exec succeeded
ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
LANDLOCK = True  # the fallback adds Landlock where the kernel has it (the tests turn it off to test the hook alone)


class Isolation(StrEnum):
    auto = "auto"  # namespaces when they work here, else the socket fallback
    namespace = "namespace"
    socket = "socket"


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # the program's exit status; -N: killed by signal N; None: it never ran
    stdout: str  # head and tail up to the cap, "[... N bytes omitted ...]" between them
    stderr: str
    timed_out: bool  # the wall-clock deadline passed and the program was killed
    killed: bool  # ended by a signal (deadline, RLIMIT_CPU, the disk cap, or a crash)
    network_isolation: str  # "netns" (namespace mode) or "socket-blocked" (the fallback)
    # "read-only" (namespace mode, every remount held), "partial" (some did not); the fallback: "landlock" (kernel
    # rules under the audit hook) or "python-guard" (the audit hook alone)
    filesystem: str
    duration_s: float = 0.0
    stdout_bytes: int = 0  # written in total, before the cap
    stderr_bytes: int = 0
    leftover_processes: int = 0  # the program's other processes still running when it ended (then killed)
    error: str | None = None  # the sandbox itself failed (could not start, no report, crashed)
    # the program was exec'd: an ``error`` then happened while it ran, and may be its doing (the code verifier scores
    # 0.0, not None); False with an error: nothing of the program ran, nothing was judged
    started: bool = False
    scratch_dir: str = ""  # already removed; its name is in the program's command line (for leak checks)
    notes: tuple[str, ...] = field(default_factory=tuple)  # remounts that failed, the disk cap, ...

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out and self.returncode == 0


_PROBE: dict[str, bool] = {}  # "namespace" -> whether the probe run worked
_PROBE_LOCK = threading.Lock()


def namespaces_available() -> bool:
    """Whether the namespace sandbox works on this machine (Linux, unprivileged user namespaces allowed, no seccomp
    profile forbidding unshare): checked once per process by running a tiny program in it."""
    with _PROBE_LOCK:
        if "namespace" not in _PROBE:
            ok = sys.platform == "linux"
            if ok:
                result = _run("print('ok')", Isolation.namespace, timeout_s=10.0, memory_mb=256,
                              max_output_bytes=4096, max_processes=8, disk_mb=4, open_files=64, site_packages=False)
                ok = result.error is None and result.returncode == 0 and result.stdout.strip() == "ok"
            _PROBE["namespace"] = ok
        return _PROBE["namespace"]


def run_sandboxed(source: str, *, timeout_s: float = 10.0, memory_mb: int = 512, isolation: str = "auto",
                  max_output_bytes: int = 64 * 1024, max_processes: int = 64, disk_mb: int = 64,
                  open_files: int = 256, site_packages: bool = False) -> SandboxResult:
    """Run the Python program ``source`` in the sandbox and return what happened; never raises for the program's
    sake and never waits past ``timeout_s`` + ``SUPERVISOR_GRACE_S``.

    ``memory_mb``: RLIMIT_AS of the program's processes. ``max_output_bytes``: kept of stdout and of stderr each
    (half from the start, half from the end). ``max_processes``: RLIMIT_NPROC (processes and threads). ``disk_mb``:
    the scratch tmpfs's size (namespace mode) and RLIMIT_FSIZE; the fallback also stops a program whose scratch
    directory outgrows it. ``site_packages``: let the program import the interpreter's installed packages (off: the
    standard library only). ``isolation``: "auto", "namespace" (RuntimeError where unavailable) or "socket".
    """
    mode = Isolation(isolation)
    if mode is Isolation.auto:
        mode = Isolation.namespace if namespaces_available() else Isolation.socket
    elif mode is Isolation.namespace and not namespaces_available():
        raise RuntimeError("namespace isolation is not available here (the probe run in new user, network, mount "
                           "and pid namespaces failed)")
    return _run(source, mode, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                max_processes=max_processes, disk_mb=disk_mb, open_files=open_files, site_packages=site_packages)


def _user_env(scratch: str) -> dict[str, str]:
    """The program's whole environment: nothing from the caller's (API keys, tokens, paths stay out)."""
    return {"PATH": ENV_PATH, "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch,
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


def _run(source: str, mode: Isolation, *, timeout_s: float, memory_mb: int, max_output_bytes: int,
         max_processes: int, disk_mb: int, open_files: int, site_packages: bool) -> SandboxResult:
    namespace = mode is Isolation.namespace
    network = "netns" if namespace else "socket-blocked"
    started_at = time.monotonic()
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="posttrain-sandbox-"))
    keep = {os.path.realpath(p) for p in (sys.executable, sys.prefix, sys.base_prefix, sys.exec_prefix)}
    if site_packages:
        keep |= {os.path.realpath(p) for p in sys.path if p}
    home, tempdir = os.path.realpath(os.path.expanduser("~")), os.path.realpath(tempfile.gettempdir())
    # what the program must not read: the caller's HOME, the temp root, /run and every user's home (namespace mode
    # covers them with empty tmpfs, the fallback's hook and Landlock rules hide them)
    hidden = sorted({home, tempdir, *map(os.path.realpath, ("/run", "/root", "/home"))} - {"/"})
    config = {"scratch": scratch, "namespace": namespace, "timeout_s": float(timeout_s), "memory_mb": memory_mb,
              "max_output_bytes": max_output_bytes, "max_processes": max_processes, "disk_mb": disk_mb,
              "open_files": open_files, "site_packages": site_packages, "python": sys.executable,
              "env": _user_env(scratch), "keep": sorted(keep), "uid": os.getuid(), "home": home, "tempdir": tempdir,
              "hidden": hidden, "landlock": LANDLOCK}
    command = [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), json.dumps(config)]

    def failed(message: str, started: bool) -> SandboxResult:
        return SandboxResult(None, "", "", False, False, network, "", time.monotonic() - started_at,
                             error=message, started=started, scratch_dir=scratch)

    try:
        with open(os.path.join(scratch, "prog.py"), "w", encoding="utf-8") as handle:
            handle.write(source)
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=scratch, env=_user_env(scratch), start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout_s + SUPERVISOR_GRACE_S)
        except subprocess.TimeoutExpired:  # the supervisor itself is stuck: kill its whole session
            _kill_session(proc.pid)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # only a process that left the session can hold the pipes open
                return failed("the supervisor did not finish and its output pipes stayed open", True)
            return failed(f"the supervisor missed its deadline; stderr: {err.decode(errors='replace')[-500:]}",
                          RUNNING in out.decode(errors="replace").splitlines())
        finally:
            # Whatever the supervisor reported: one that failed or was killed before its sweep leaves the program
            # running. Cheap when nothing is left; while anything of the session lives, its id cannot be reused.
            _kill_session(proc.pid)
        lines = out.decode(errors="replace").strip().splitlines()
        started = RUNNING in lines
        try:
            report = json.loads(lines[-1])
        except (ValueError, IndexError):
            return failed(f"no report from the supervisor (exit {proc.returncode}): "
                          f"{err.decode(errors='replace')[-500:]}", started)
        if "error" in report:
            return failed(report["error"], started)
        return SandboxResult(
            returncode=report["returncode"], stdout=report["stdout"], stderr=report["stderr"],
            timed_out=report["timed_out"], killed=report["killed"], network_isolation=network,
            filesystem=report["filesystem"], duration_s=time.monotonic() - started_at,
            stdout_bytes=report["stdout_bytes"], stderr_bytes=report["stderr_bytes"],
            leftover_processes=report["leftover_processes"], started=True, scratch_dir=scratch,
            notes=tuple(report["notes"]))
    except OSError as error:
        return failed(f"could not start the sandbox: {error}", False)
    finally:
        remove_tree(scratch)


def remove_tree(path: str) -> None:
    """``rmtree`` that also removes what the program made unreadable (``os.chmod(d, 0)``): permissions are restored
    and the removal retried, so no scratch directory is left behind."""
    def retry(function, failed_path, _error):
        try:
            os.chmod(os.path.dirname(failed_path) or ".", 0o700)
            if os.path.isdir(failed_path) and not os.path.islink(failed_path):
                os.chmod(failed_path, 0o700)
            function(failed_path)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)
    if os.path.exists(path):  # a directory emptied only on the second pass
        shutil.rmtree(path, ignore_errors=True)


def _processes():
    """(pid, /proc/PID/stat's fields after the command name: [state, ppid, pgrp, session, ...]) of every process
    not yet a zombie."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                data = handle.read().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        stat = data[data.rfind(")") + 2:].split()
        if stat and stat[0] not in "ZX":
            yield int(pid), stat


def _kill(pid: int, group: bool = False) -> None:
    """SIGKILL to a process (or its process group), if it still exists."""
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except OSError:
        pass


def _kill_session(sid: int) -> None:
    """SIGKILL to a session: its process groups, then any process whose session is ``sid`` (/proc scan), again
    until none is left running (a kill is asynchronous) or ``SWEEP_S`` passes."""
    _kill(sid, group=True)
    deadline = time.monotonic() + SWEEP_S
    while True:
        left = False
        for pid, stat in _processes():
            if stat[3] == str(sid):
                left = True
                _kill(pid)
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.005)


# ----------------------------------------------------------------------------------------------------------------
# The supervisor (this file run as a script; standard library only)

# linux/mount.h, linux/prctl.h, linux/capability.h
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MOUNT_OPTIONS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
                 "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 36, 38, 47
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
NOBODY = 65534  # the host uid/gid a root caller's program runs as (in-namespace uid 1)
PR_CAP_AMBIENT_CLEAR_ALL, LINUX_CAPABILITY_VERSION_3 = 4, 0x20080522
DEVICES = ("null", "zero", "full", "random", "urandom")
# linux/landlock.h: the syscalls (one number on every architecture), filesystem rights (ABI 1: bits 0-12; ABI 2
# adds REFER, 3 TRUNCATE, 5 IOCTL_DEV), TCP rights (ABI 4) and scopes (ABI 6: abstract Unix sockets, signals)
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF, LANDLOCK_RULE_PATH_BENEATH = 444, 445, 446, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR, FS_TRUNCATE, FS_IOCTL_DEV = 1, 2, 4, 8, 1 << 14, 1 << 15
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # those a file rule takes
NET_BIND_TCP, NET_CONNECT_TCP, SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2, 1, 2


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def _mount(libc, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    import ctypes

    encode = (lambda s: None if s is None else s.encode())
    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, flags to keep) of every mount, parents first (/proc/self/mountinfo escapes spaces as \\040)."""
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            flags = 0
            for option in fields[5].split(","):
                flags |= MOUNT_OPTIONS.get(option, 0)
            points.append((point, flags))
    return points


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _private_filesystem(libc, config: dict) -> list[str]:
    """Inside the mount namespace (we are its root, with every capability until the program drops them): a fresh
    /dev, every mount read-only, nosuid and nodev, a tmpfs scratch directory, the hidden directories (the caller's
    HOME, the temp root, /run, /root, /home) covered. Returns the steps that failed (each is skipped, the rest still
    applied)."""
    scratch, failures = config["scratch"], []
    keep = [k for k in config["keep"] if not any(k != o and _under(k, o) for o in config["keep"])]  # outermost
    points = _mount_points()
    nodes = {}
    for name in DEVICES:  # bound in below from the old /dev: a bind copies its source mount's flags, so first
        try:
            nodes[name] = os.open(f"/dev/{name}", os.O_PATH)
        except OSError:
            pass

    def attempt(step, *args):
        try:
            step(*args)
        except OSError as error:
            failures.append(str(error))

    def fresh_dev():
        _mount(libc, "tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755")
        for name, fd in nodes.items():
            open(f"/dev/{name}", "w").close()
            _mount(libc, f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                             ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"/dev/{name}")
        os.mkdir("/dev/shm")
        _mount(libc, "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=16m,mode=1777")
        _mount(libc, None, "/dev", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)

    attempt(fresh_dev)
    for fd in nodes.values():
        os.close(fd)
    for point, flags in points:
        if not _under(point, "/dev"):
            attempt(_mount, libc, None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | flags)

    def cover(path: str) -> None:
        """An empty read-only tmpfs over a directory the program has no business reading, with the interpreter's
        directories under it (pyenv lives in ~/.pyenv) bound back in at their paths."""
        if not os.path.isdir(path) or os.path.islink(path):
            return
        held = {k: os.open(k, os.O_PATH) for k in keep if _under(k, path) and k != path and os.path.exists(k)}
        if len(held) < sum(_under(k, path) for k in keep):  # the interpreter is this directory itself: keep it
            return
        try:
            _mount(libc, "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755")
            for inner, fd in held.items():
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.makedirs(inner, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(inner), exist_ok=True)
                    open(inner, "w").close()
                _mount(libc, f"/proc/self/fd/{fd}", inner, None, MS_BIND | MS_REC)
            if _under(scratch, path):
                os.makedirs(scratch, mode=0o700)
            _mount(libc, None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        finally:
            for fd in held.values():
                os.close(fd)

    for path in config["hidden"]:  # sorted: a directory before what is under it
        if not _under(scratch, path) or path == config["tempdir"]:
            attempt(cover, path)
    owner = ",uid=1,gid=1" if config["uid"] == 0 else ""  # a root caller's program runs as in-namespace uid 1
    attempt(_mount, libc, "tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV,
            f"size={config['disk_mb']}m,mode=700{owner}")
    return failures


def _drop_capabilities(libc, uid: int | None) -> None:
    """No capability left, now or after exec (bounding set emptied), and none to regain (no_new_privs is set by the
    caller): root inside the namespace can no longer remount, unmount or bring up an interface. ``uid``: switch to
    this uid and gid first (while CAP_SETUID is still held)."""
    import ctypes

    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # leaving uid 0 also clears the permitted and effective sets

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    if libc.capset(ctypes.byref(Header(LINUX_CAPABILITY_VERSION_3, 0)), (Data * 2)()) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _landlock_abi(libc) -> int:
    """The kernel's Landlock ABI version, 0 where there is none (older kernel, LSM off, a seccomp profile)."""
    return max(0, libc.syscall(LANDLOCK_CREATE_RULESET, None, 0, 1))  # 1: LANDLOCK_CREATE_RULESET_VERSION


def _landlock_fs_rights(abi: int) -> int:
    return (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1


def _landlock_rules(config: dict, abi: int) -> list[tuple[str, int]]:
    """(path, rights) of the fallback's Landlock ruleset: everything in the scratch directory; read and execute in
    the interpreter's directories and everywhere else except the hidden directories, /proc and /dev; read and write
    of the few devices. Landlock cannot take a subtree out of a granted one, so a directory holding a hidden one is
    walked and its other entries granted one by one (/ and, for HOME=/home/me, /home)."""
    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    hidden = config["hidden"] + ["/proc", "/dev"]
    rules = [(config["scratch"], _landlock_fs_rights(abi))] + [(k, read) for k in config["keep"]]
    rules += [(f"/dev/{name}", FS_READ_FILE | FS_WRITE_FILE) for name in DEVICES]

    def walk(directory: str) -> None:
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            return
        for entry in entries:
            path = os.path.realpath(os.path.join(directory, entry))  # a link to a hidden directory is hidden
            if any(_under(path, h) for h in hidden):
                continue
            if any(_under(h, path) for h in hidden):
                if path != directory and _under(path, directory):  # not a link back up (no loop)
                    walk(path)
            else:
                rules.append((path, read))

    walk("/")
    return rules


def _landlock_restrict(libc, abi: int, rules: list[tuple[str, int]]) -> None:
    """Put this process (the forked program, no_new_privs already set) under a Landlock ruleset that handles every
    filesystem right the kernel knows and grants ``rules``; from ABI 4 no TCP bind or connect, from ABI 6 no signal
    to and no abstract Unix socket of a process outside. Kernel-enforced: what the audit hook's path checks cannot
    promise against a racing thread, ``dir_fd`` or ``pidfd_send_signal``."""
    import ctypes
    import stat
    import struct

    fs = _landlock_fs_rights(abi)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("QQQ", fs, net, scoped)[:8 if abi < 4 else 16 if abi < 6 else 24]  # the ABI's struct size

    def check(result: int, what: str) -> int:
        if result < 0:
            raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")
        return result

    ruleset = check(libc.syscall(LANDLOCK_CREATE_RULESET, attr, len(attr), 0), "landlock_create_ruleset")
    for path, rights in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:  # gone since the rules were listed
            continue
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                rights &= FS_FILE_RIGHTS
            rule = struct.pack("=Qi", rights & fs, fd)  # struct landlock_path_beneath_attr (packed)
            check(libc.syscall(LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, 0),
                  f"landlock_add_rule {path}")
        finally:
            os.close(fd)
    check(libc.syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)


def _uid_tasks(uid: int) -> int:
    """Processes and threads of ``uid`` now: RLIMIT_NPROC counts all of them, not just the sandbox's."""
    total = 0
    for pid, _ in _processes():
        try:
            with open(f"/proc/{pid}/status") as handle:
                status = dict(line.split(":", 1) for line in handle if ":" in line)
            if int(status["Uid"].split()[0]) == uid:
                total += int(status["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return total


_GUARD = r'''
def _posttrain_guard(scratch, allowed_devices, hidden, keep, *, any=any, bool=bool, bytes=bytes, id=id, int=int,
                     isinstance=isinstance, len=len, range=range, str=str, PermissionError=PermissionError):
    # The builtins above are bound now: the program could replace them in the builtins module, not here.
    import os, sys, posix, _imp, _posixsubprocess, _signal
    own = str(os.getpid())
    # C functions bound before the program runs; os.path's helpers are Python the program could patch
    stat, readlink, getcwd, fspath = posix.stat, posix.readlink, posix.getcwd, posix.fspath
    encoding = sys.getfilesystemencoding()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    hidden, keep = tuple(hidden), tuple(keep)

    def deny(what):
        raise PermissionError(f"sandbox: {what} is not allowed (socket-blocked fallback)")

    def text(path):
        # a plain str of the path's own characters (a str subclass could override the methods used below)
        path = fspath(path)
        return b"".join((path,)).decode(encoding, "surrogateescape") if isinstance(path, bytes) else "".join((path,))

    def resolve(path):
        # the absolute path the kernel opens, symlinks followed (os.path.realpath's rules, from C calls only)
        if isinstance(path, int):
            return None
        path = text(path)
        pending = (path if path.startswith("/") else getcwd() + "/" + path).split("/")[::-1]
        resolved, links = "", 0
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                resolved = resolved[:resolved.rfind("/")]
                continue
            try:
                target = readlink(resolved + "/" + name) if links < 40 else None
            except OSError:  # not a link, or missing
                target = None
            if target is None:
                resolved += "/" + name
            else:
                links += 1
                pending += target.split("/")[::-1]
                resolved = "" if target.startswith("/") else resolved
        return resolved or "/"

    def isdir(path):
        try:
            return stat(path).st_mode & 0o170000 == 0o040000
        except OSError:
            return False

    def under(path, root):
        return path == root or path.startswith(root.rstrip("/") + "/")

    def inside(path):
        return under(path, scratch) or path in allowed_devices

    def other_process(path):
        parts = path.split("/")
        return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != own

    def readable(path):
        """What namespace mode would let a root caller's program (the nobody user there) read: not the covered
        directories, and only files every user may read (the program here may be uid 0 without capabilities, which
        still reads root's own 0600 files such as /etc/shadow)."""
        if inside(path) or any(under(path, k) for k in keep) or path.startswith(f"/proc/{own}/"):
            return True
        if other_process(path) or any(under(path, h) for h in hidden):
            return False
        try:
            parts = path.split("/")
            if any(not stat("/".join(parts[:i]) or "/").st_mode & 0o001 for i in range(1, len(parts))):
                return False  # a directory on the way others cannot enter
            return bool(stat(path).st_mode & 0o004)
        except OSError:
            return True  # missing: the open fails by itself

    def check_write(event, *paths):
        for path in paths:
            resolved = resolve(path)
            if resolved is not None and not inside(resolved):
                deny(f"{event} outside the scratch directory")

    def refusal(what):
        message = f"sandbox: {what} is not allowed (socket-blocked fallback)"

        def refused(*args, **kwargs):
            raise PermissionError(message)
        refusals.append(refused)
        return refused

    # Calls that start a process or reach another one without an audit event: replaced by refusals wherever they
    # are held. A fresh copy of their module would bring them back: every built-in module is loaded now and none
    # can be created afresh later (an extension module's load raises the "import" event, refused below).
    refusals = []
    unaudited = {"fork_exec": "starting a process", "pidfd_open": "opening a process's pidfd",
                 "pidfd_send_signal": "signalling through a pidfd", "setpriority": "changing a priority",
                 "sched_setaffinity": "changing a CPU affinity", "sched_setscheduler": "changing a scheduling policy",
                 "sched_setparam": "changing a scheduling priority"}
    for name in sys.builtin_module_names:
        __import__(name)
    for module in (_posixsubprocess, posix, os, _signal, sys.modules.get("signal")):
        for name, what in unaudited.items():
            if hasattr(module, name):
                setattr(module, name, refusal(what))
    _imp.create_builtin = refusal("creating a built-in module afresh")
    blocked = frozenset({
        "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
        "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "socket.connect", "socket.bind",
        "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
        "socket.getnameinfo", "socket.sethostname", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags",
        "cpython.PyInterpreterState_New",  # a subinterpreter has none of this interpreter's audit hooks
        # what reaches into this guard's functions: the garbage collector's object graph, tracers
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile"})
    one_path = frozenset({"os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.chown", "os.utime", "os.truncate",
                          "shutil.rmtree"})
    two_paths = frozenset({"os.rename", "os.link"})
    refused_imports = frozenset({"_ctypes", "ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi",
                                 "_testinternalcapi"})

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            resolved = resolve(path)
            if resolved is None:
                return
            if other_process(resolved):
                deny("reading another process's /proc entries")
            writes = (flags & write_flags) if isinstance(flags, int) and flags > 0 else any(
                c in (mode or "") for c in "wax+")
            if writes and not inside(resolved):
                deny("writing outside the scratch directory")
            if not readable(resolved):
                deny("reading outside the scratch directory what namespace mode hides")
            if not inside(resolved) and isdir(resolved):  # its descriptor as dir_fd would dodge these checks
                deny("opening a directory outside the scratch directory")
        elif event in ("os.listdir", "os.scandir"):
            resolved = resolve(args[0] if args and args[0] is not None else ".")
            if resolved is not None and not readable(resolved):
                deny("listing a directory namespace mode hides")
        elif event == "os.symlink":  # a relative target is read from the link's directory, not the current one
            target, link = text(args[0]), resolve(args[1])
            check_write(event, target if target.startswith("/") else link[:link.rfind("/")] + "/" + target, link)
        elif event in one_path or event in two_paths:
            check_write(event, *args[:2 if event in two_paths else 1])
        elif event in blocked:
            deny(event)
        elif event == "socket.__new__" and args[1] != 1:  # AF_UNIX socketpairs (asyncio's wake-up) stay
            deny("a network socket")
        elif event in ("os.kill", "os.killpg") and str(args[0]) not in (own, "0"):
            deny("signalling another process")
        elif event == "resource.prlimit" and str(args[0]) not in (own, "0"):
            deny("changing another process's resource limits")
        elif event == "object.__setattr__" and args[1] == "__code__" and id(args[0]) in guarded:
            deny("rewriting the sandbox's guard")  # one of its functions, reached through a traceback say
        elif event == "import" and args[0] in refused_imports:
            deny(f"importing {args[0]}")

    guarded = frozenset(map(id, (deny, text, resolve, isdir, under, inside, other_process, readable, check_write,
                                 refusal, hook, *refusals)))
    sys.addaudithook(hook)
'''


def _program_command(config: dict) -> list[str]:
    # -s -S -B -P rather than -I: -I implies -E, which would ignore PYTHONHASHSEED=0 (the environment is ours anyway)
    flags = ["-s", "-B", "-P"] + ([] if config["site_packages"] else ["-S"])
    program = os.path.join(config["scratch"], "prog.py")
    if config["namespace"]:
        return [config["python"], *flags, program]
    devices = tuple(f"/dev/{name}" for name in DEVICES)
    guard = f"_posttrain_guard({config['scratch']!r}, {devices!r}, {config['hidden']!r}, {config['keep']!r})"
    boot = (_GUARD + guard + "\ndel _posttrain_guard\n"
            "import runpy, sys\nsys.argv = sys.argv[1:]\nsys.path[0] = " + repr(config["scratch"]) + "\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    return [config["python"], *flags, "-c", boot, program]


def _exec_program(libc, config: dict, stdout_fd: int, stderr_fd: int, status_fd: int, nproc: int,
                  landlock: list[tuple[str, int]] | None, abi: int, run_as: int | None) -> None:
    """In the forked child: its own process group, stdio, no capabilities (and the uid ``run_as``, if given),
    rlimits, the fallback's Landlock rules (``landlock``), then exec the program. ``status_fd`` (close-on-exec)
    stays open for a set-up error."""
    import resource

    os.setpgid(0, 0)
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    os.closerange(3, status_fd)
    os.closerange(status_fd + 1, 65536)
    # in the fallback too: a root caller that cannot hand the program to nobody gives it uid 0, not its powers
    _drop_capabilities(libc, run_as)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    cpu = math.ceil(config["timeout_s"]) + 1
    memory, disk = config["memory_mb"] << 20, config["disk_mb"] << 20
    for limit, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (memory, memory)),
                         (resource.RLIMIT_FSIZE, (disk, disk)), (resource.RLIMIT_NPROC, (nproc, nproc)),
                         (resource.RLIMIT_NOFILE, (config["open_files"], config["open_files"])),
                         (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(limit, value)  # soft = hard: the program cannot raise them again
    if landlock is not None:  # its own /proc entries stay readable, no other process's
        _landlock_restrict(libc, abi, landlock + [(f"/proc/{os.getpid()}", FS_READ_FILE | FS_READ_DIR)])
    os.chdir(config["scratch"])
    command = _program_command(config)
    os.execve(command[0], command, config["env"])


class _Capture:
    """The first and the last ``cap // 2`` bytes of a stream, and its total length."""

    def __init__(self, cap: int):
        self.half, self.head, self.tail, self.total = cap // 2, bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data[-self.half:] if self.half else b""
            if len(self.tail) > self.half:
                del self.tail[:len(self.tail) - self.half]

    def text(self) -> str:
        omitted = self.total - len(self.head) - len(self.tail)
        middle = f"\n[... {omitted} bytes omitted ...]\n" if omitted > 0 else ""
        return self.head.decode(errors="replace") + middle + self.tail.decode(errors="replace")


def _tree_bytes(root: str, max_entries: int = 10_000) -> int:
    """Bytes under ``root`` (allocated blocks); past ``max_entries`` files, reported as unbounded."""
    total, seen, stack = 0, 0, [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if seen > max_entries:
                return sys.maxsize
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
    return total


def _reap(pid: int, status: int | None) -> tuple[int | None, bool]:
    """Collect every exited child (we are a subreaper or the namespace's init). Returns (the program's status if
    seen, whether children remain)."""
    while True:
        try:
            done, code = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return status, False
        if done == 0:
            return status, True
        if done == pid:
            status = code


def _others(pid: int, namespace: bool) -> int:
    """The program's other processes still running (zombies not counted): in the pid namespace every process but us
    and the program; in the fallback the members of its process group and what was re-parented to us. A process
    in the middle of exiting is not a zombie yet: a count above 0 is taken again after ``RECOUNT_S``."""
    me = os.getpid()

    def count() -> int:
        return sum(other not in (me, pid) and (namespace or stat[1] == str(me) or stat[2] == str(pid))
                   for other, stat in _processes())

    if count() == 0:
        return 0
    time.sleep(RECOUNT_S)
    return count()


def _sweep(pid: int, namespace: bool, status: int | None) -> tuple[int | None, int]:
    """Kill everything the program started: its process group, then (pid namespace) every process of the namespace,
    or (fallback) every process re-parented to us, until none is left or ``SWEEP_S`` passes. Returns the program's
    wait status and how many other processes of it were still running."""
    try:
        leftover = _others(pid, namespace)
    finally:  # the group dies even if the count failed (a resource of ours exhausted)
        _kill(pid, group=True)
    deadline = time.monotonic() + SWEEP_S
    me = str(os.getpid())
    while time.monotonic() < deadline:
        left = False
        if namespace:
            _kill(-1)  # as the namespace's init: every process in it but us
        else:
            for child, stat in _processes():
                if stat[1] == me:
                    left = True
                    _kill(child)
        status, remaining = _reap(pid, status)
        if not left and not remaining:
            break
        time.sleep(0.005)
    return status, leftover


def _watch(pid: int, streams: dict[int, _Capture], deadline: float, config: dict) -> tuple[int | None, bool, list]:
    """Read the program's output until it exits (plus ``EXIT_GRACE_S`` for pipes a descendant holds) or the
    deadline passes. Returns (wait status or None, timed out, notes)."""
    import selectors

    selector = selectors.DefaultSelector()
    for fd in streams:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(pid)
            selector.register(pidfd, selectors.EVENT_READ)
        except OSError:
            pidfd = None
    status, exited_at, timed_out, notes = None, 0.0, False, []
    disk_limit, next_disk_check = config["disk_mb"] << 20, 0.0
    open_fds = set(streams)
    while True:
        now = time.monotonic()
        if status is None:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status, exited_at = code, now
                if pidfd is not None:
                    selector.unregister(pidfd)
                    os.close(pidfd)
                    pidfd = None
        if status is not None and (not open_fds or now - exited_at > EXIT_GRACE_S):
            break
        if status is None and now >= deadline:
            timed_out = True
            break
        if not config["namespace"] and now >= next_disk_check:  # the tmpfs caps it in namespace mode
            next_disk_check = now + 0.25
            if _tree_bytes(config["scratch"]) > disk_limit:
                notes.append(f"killed: the scratch directory outgrew {config['disk_mb']} MB")
                break
        wait = min(0.25, max(0.0, (deadline if status is None else exited_at + EXIT_GRACE_S) - now))
        for key, _ in selector.select(wait):
            if key.fd == pidfd:
                continue
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if data:
                streams[key.fd].add(data)
            else:
                selector.unregister(key.fd)
                open_fds.discard(key.fd)
    for fd in list(open_fds):
        selector.unregister(fd)
    if pidfd is not None:
        os.close(pidfd)
    return status, timed_out, notes


def _drain(streams: dict[int, _Capture], seconds: float) -> None:
    """What the dead program left in its pipes (all writers are gone, so this ends at EOF)."""
    deadline = time.monotonic() + seconds
    for fd, capture in streams.items():
        while time.monotonic() < deadline:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            capture.add(data)
        os.close(fd)


def _supervise(config: dict) -> dict:
    """Set up, fork and exec the program, watch it, kill what is left, report."""
    deadline = time.monotonic() + config["timeout_s"]
    namespace = config["namespace"]
    libc = _libc()
    failures: list[str] = []
    run_as = None  # the program's uid, where it is not ours
    if namespace:
        with open(os.path.join(config["scratch"], "prog.py"), "rb") as handle:
            program = handle.read()
        failures = _private_filesystem(libc, config)
        with open(os.path.join(config["scratch"], "prog.py"), "wb") as handle:  # into the fresh tmpfs
            handle.write(program)
        run_as = 1 if config["uid"] == 0 else None  # mapped to the host's nobody
        # counted per (user namespace, uid): the program's processes, plus us when we share its uid
        nproc = config["max_processes"] + (0 if config["uid"] == 0 else 1)
    else:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the program come to us, not to init
        if config["uid"] == 0:
            if _nobody_can_run(config):
                run_as = NOBODY
            else:
                failures.append("the program runs as uid 0 (without capabilities): the host's nobody cannot reach "
                                "the interpreter, its library or the scratch directory")
        nproc = _uid_tasks(config["uid"] if run_as is None else run_as) + config["max_processes"]  # the whole uid
    abi = _landlock_abi(libc) if not namespace and config["landlock"] else 0
    landlock = _landlock_rules(config, abi) if abi else None
    if not namespace and not abi:
        failures.append("no Landlock (kernel or LANDLOCK): the fallback's file, signal and TCP rules are Python-level")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    status_r, status_w = os.pipe()  # close-on-exec: EOF once the program runs, else the child's set-up error
    pid = os.fork()
    if pid == 0:
        try:
            _exec_program(libc, config, out_w, err_w, status_w, nproc, landlock, abi, run_as)
        except BaseException as error:
            os.write(status_w, f"could not start the program: {error!r}".encode())
        finally:
            os._exit(126)
    streams = {out_r: _Capture(config["max_output_bytes"]), err_r: _Capture(config["max_output_bytes"])}
    try:
        try:
            os.setpgid(pid, pid)  # also done in the child; whichever runs first
        except OSError:
            pass
        for fd in (out_w, err_w, status_w):
            os.close(fd)
        import select

        ready, _, _ = select.select([status_r], [], [], max(0.0, deadline - time.monotonic()))
        setup_error = os.read(status_r, 4096).decode(errors="replace") if ready else ""
        os.close(status_r)
        if setup_error:  # the sandbox failed, not the program: nothing is judged
            _sweep(pid, namespace, None)
            _drain(streams, 0.5)
            return {"error": setup_error}
        if ready:  # to the caller's pipe (the namespace's init holds it too): a failure from here on scores 0.0
            os.write(1, (RUNNING + "\n").encode())
        status, timed_out, notes = _watch(pid, streams, deadline, config)
        status, leftover = _sweep(pid, namespace, status)
    except BaseException:
        # We failed while the program may run (a resource of ours it exhausted, say): it must not outlive us. The
        # caller then kills what is left of our session.
        _kill(pid, group=True)
        raise
    if status is None:
        status = _reap_blocking(pid)
    _drain(streams, 0.5)
    code = os.waitstatus_to_exitcode(status) if status is not None else None
    if namespace:
        filesystem = "partial" if failures else "read-only"
    else:
        filesystem = "landlock" if abi else "python-guard"
        if 0 < abi < 6:
            notes.append(f"Landlock ABI {abi} has no signal scope: signals to other processes are refused by the "
                         "Python-level guard only")
    return {"returncode": code, "timed_out": timed_out, "killed": code is not None and code < 0,
            "stdout": streams[out_r].text(), "stderr": streams[err_r].text(),
            "stdout_bytes": streams[out_r].total, "stderr_bytes": streams[err_r].total,
            "leftover_processes": leftover, "filesystem": filesystem, "notes": failures + notes}


def _nobody_can_run(config: dict) -> bool:
    """Fallback, root caller: hand the scratch directory to the host's nobody and say whether the program can run
    as that user: the interpreter, its standard library, the scratch directory and (``site_packages``) the import
    path reachable. Asked of the kernel in a child that takes nobody's ids, not guessed from permission bits."""
    scratch = config["scratch"]
    for path in (scratch, os.path.join(scratch, "prog.py")):
        os.chown(path, NOBODY, NOBODY)
    needs = [(config["python"], os.X_OK), (os.path.dirname(os.__file__), os.R_OK | os.X_OK),
             (scratch, os.R_OK | os.W_OK | os.X_OK)]
    if config["site_packages"]:
        needs += [(path, os.R_OK) for path in config["keep"] if os.path.exists(path)]
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            code = 0 if all(os.access(path, mode) for path, mode in needs) else 1
        finally:
            os._exit(code)
    if _wait_deadline(child, 5.0) == 0:
        return True
    for path in (scratch, os.path.join(scratch, "prog.py")):  # uid 0 without capabilities obeys the mode bits
        os.chown(path, 0, 0)
    return False


def _reap_blocking(pid: int) -> int | None:
    deadline = time.monotonic() + SWEEP_S
    while time.monotonic() < deadline:
        try:
            done, code = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return code
        time.sleep(0.005)
    return None


def _write_id_maps(pid: int, uid: int, gid: int) -> None:
    """The new user namespace's uid/gid maps, written from the parent namespace (a multi-line map needs CAP_SETUID
    there). Root: in-namespace 0 = root (to set up the mounts), 1 = nobody (the program). Anyone else: 0 = itself."""
    if uid == 0:
        uid_map, gid_map = f"0 0 1\n1 {NOBODY} 1\n", f"0 0 1\n1 {NOBODY} 1\n"
    else:
        with open(f"/proc/{pid}/setgroups", "w") as handle:  # required before an unprivileged gid_map
            handle.write("deny")
        uid_map, gid_map = f"0 {uid} 1\n", f"0 {gid} 1\n"
    for name, content in (("uid_map", uid_map), ("gid_map", gid_map)):
        with open(f"/proc/{pid}/{name}", "w") as handle:
            handle.write(content)


def _wait_deadline(pid: int, seconds: float) -> int | None:
    """waitpid with a deadline: the exit code, or None if ``pid`` is still running then."""
    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.002)


def _supervise_in_namespaces(config: dict) -> dict:
    """Enter new user, mount, network and pid namespaces, then fork the pid namespace's init, which runs
    ``_supervise``; its report comes back through a pipe. A short-lived helper left in the parent namespace writes
    the id maps. If we die, the init gets SIGKILL (PR_SET_PDEATHSIG) and with it every process of the namespace."""
    libc = _libc()
    ready_r, ready_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        code = 1
        try:
            os.close(ready_w)
            if os.read(ready_r, 1) == b"u":
                _write_id_maps(os.getppid(), config["uid"], os.getgid())
                code = 0
        finally:
            os._exit(code)
    os.close(ready_r)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID) != 0:
        import ctypes

        errno = ctypes.get_errno()
        os.close(ready_w)
        _wait_deadline(helper, 5.0)
        raise OSError(errno, f"unshare: {os.strerror(errno)}")
    os.write(ready_w, b"u")
    os.close(ready_w)
    if _wait_deadline(helper, 5.0) != 0:
        raise OSError("could not write the user namespace's id maps")
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here propagates to the host
    report_r, report_w = os.pipe()
    init = os.fork()
    if init == 0:  # pid 1 of the new pid namespace
        try:
            os.close(report_r)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            # the kernel drops signals from inside the namespace to its init unless the init handles them: Python's
            # SIGINT handler would let a program running as our uid (an unprivileged caller's) stop us
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this namespace's processes
            report = _supervise(config)
        except BaseException as error:
            report = {"error": f"namespace init: {error!r}"}
        try:
            os.write(report_w, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(report_w)
    import select

    chunks, deadline = [], time.monotonic() + config["timeout_s"] + SWEEP_S + 3.0
    while time.monotonic() < deadline:
        readable, _, _ = select.select([report_r], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(report_r, 1 << 20) if readable else b""
        if not chunk:
            break
        chunks.append(chunk)
    os.close(report_r)
    if _wait_deadline(init, 2.0) is None:
        os.kill(init, signal.SIGKILL)  # the init's death ends the namespace and everything in it
        _wait_deadline(init, 2.0)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        return {"error": "the namespace's init sent no report"}


if __name__ == "__main__":
    try:  # the OOM killer's first choice (inherited by the program; only CAP_SYS_RESOURCE could lower it again)
        with open("/proc/self/oom_score_adj", "w") as _handle:
            _handle.write("1000")
    except OSError:
        pass
    try:
        _config = json.loads(sys.argv[1])
        _report = (_supervise_in_namespaces if _config["namespace"] else _supervise)(_config)
    except BaseException as _error:  # the sandbox failed: None before the program's exec, 0.0 after (RUNNING)
        _report = {"error": f"supervisor: {_error!r}"}
    os.write(1, (json.dumps(_report) + "\n").encode())
