"""The code verifier's throughput under attack: benign programs alone, then mixed with hostile ones.

Runs a fixed mix through the verifier's own batch API (``code_rewards``, ``--workers`` sandboxes at once) in each
isolation mode that works here (namespace, socket fallback): the benign programs alone, then the same benign
programs interleaved with as many hostile ones (sleeping past the deadline, background processes, descriptor
exhaustion, signals to and limits of the parent, ctypes, a subinterpreter, link and /proc escapes, fork/memory
bombs, an output flood). Prints programs/s of both runs, the fraction of benign programs still scored right under
attack (must be 100%), the fraction of hostile ones scored 0.0 (must be 100%: None, "cannot judge", is dropped by
RL, so a hostile program that broke the sandbox into None would dodge its 0), p50/p95/max latency of one sandbox
run, and what is left
afterwards: processes of any program, scratch directories, the caller's descriptors, the host files the attacks
aimed at (must all be 0 / unchanged). A second table shows how each hostile program ended.

    python benchmarks/sandbox_attack.py                  # 50 benign + 50 hostile, 4 workers, 2 s deadline
    python benchmarks/sandbox_attack.py --benign 20 --hostile 20 --modes socket
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from posttrain.rewards import sandbox  # noqa: E402
from posttrain.verifiers import code_rewards  # noqa: E402

# (correct, wrong, tests) of each task; a benign program is one of them, scored 1.0 or 0.0
TASKS = {
    "add": ("def f(a, b):\n    return a + b\n", "def f(a, b):\n    return a - b\n",
            "assert f(1, 2) == 3\nassert f(-1, 1) == 0\n"),
    "factorial": ("import math\ndef f(n):\n    return math.factorial(n)\n",
                  "def f(n):\n    return n * (n - 1)\n", "assert f(5) == 120\nassert f(0) == 1\n"),
    "reverse": ("def f(s):\n    return s[::-1]\n", "def f(s):\n    return s\n",
                "assert f('abc') == 'cba'\nassert f('') == ''\n"),
    "primes": ("def f(n):\n    return [p for p in range(2, n) if all(p % d for d in range(2, p))]\n",
               "def f(n):\n    return list(range(2, n))\n", "assert f(12) == [2, 3, 5, 7, 11]\n"),
    "sort": ("def f(xs):\n    return sorted(xs)\n", "def f(xs):\n    return xs\n",
             "assert f([3, 1, 2]) == [1, 2, 3]\n"),
}

# Each hostile program sets ``pwned = True`` only if its attack worked from where it stands; its tests assert it.
# MARKER (in the command line of every process it execs), SECRET and TARGET (host files) are filled in.
LATER = "[sys.executable, '-c', 'import time; time.sleep(30)', MARKER]"
HOSTILE = {
    "time.sleep past the deadline": "import time\ntime.sleep(60)\npwned = True\n",
    "busy loop ignoring SIGXCPU": "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n"
                                  "    pass\n",
    "blocking read on a pipe": "import os\nr, w = os.pipe()\nos.read(r, 1)\npwned = True\n",
    "signal.pause, SIGALRM re-armed": "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                      "signal.signal(signal.SIGALRM, lambda *a: signal.alarm(1))\nsignal.alarm(1)\n"
                                      "while True:\n    signal.pause()\n",
    "fork, setsid, double fork": f"import os, sys\npid = os.fork()\nif pid == 0:\n    os.setsid()\n"
                                 f"    if os.fork() == 0:\n        os.execv(sys.executable, {LATER})\n    os._exit(0)\n"
                                 f"os.waitpid(pid, 0)\npwned = True\n",
    "nohup through os.system": f"import os, shlex, sys\nos.system('nohup ' + shlex.join({LATER}) + ' &')\n"
                               "pwned = True\n",
    "subprocess in a new session": f"import subprocess, sys\nsubprocess.Popen({LATER}, start_new_session=True)\n"
                                   f"pwned = True\n",
    "a child ignoring SIGTERM": f"import os, signal, sys\nif os.fork() == 0:\n"
                                f"    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                f"    os.execv(sys.executable, {LATER})\npwned = True\n",
    "non-daemon thread": "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\n"
                         "pwned = True\n",
    "open files until EMFILE": "held = []\ntry:\n    while True:\n        held.append(open('/dev/null'))\n"
                               "except OSError:\n    pwned = len(held) > 100_000\n",
    "pipes until EMFILE": "import os\nheld = []\ntry:\n    while True:\n        held.append(os.pipe())\n"
                          "except OSError:\n    pwned = len(held) > 100_000\n",
    "socketpairs until EMFILE": "import socket\nheld = []\ntry:\n    while True:\n"
                                "        held.append(socket.socketpair())\nexcept OSError:\n"
                                "    pwned = len(held) > 100_000\n",
    "kill(ppid, SIGKILL)": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\npwned = True\n",
    "kill(ppid, SIGSTOP)": "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\npwned = True\n",
    "killpg(0, SIGKILL)": "import os, signal\nos.killpg(0, signal.SIGKILL)\npwned = True\n",
    "kill(-1, SIGKILL)": "import os, signal\nos.kill(-1, signal.SIGKILL)\npwned = True\n",
    "pidfd_send_signal(ppid)": "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), "
                               "signal.SIGKILL)\npwned = True\n",
    "prlimit(ppid, NOFILE 0)": "import os, resource\nresource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (0, 0))\n"
                               "pwned = True\n",
    "setpriority(ppid, 19)": "import os\nos.setpriority(os.PRIO_PROCESS, os.getppid(), 19)\npwned = True\n",
    "a subinterpreter": "import _xxsubinterpreters as si\nsi.run_string(si.create(), \"open('/etc/shadow').read()\")\n"
                        "pwned = True\n",
    "ctypes system()": "import ctypes, sys\ncommand = '%s -c \"import time; time.sleep(30)\" %s &' % "
                       "(sys.executable, MARKER)\npwned = ctypes.CDLL(None).system(command.encode()) == 0\n",
    "ctypes fork()": "import ctypes, os, time\nif ctypes.CDLL(None).fork() == 0:\n    os.setsid()\n"
                     "    time.sleep(30)\npwned = True\n",
    "ctypes kill(ppid)": "import ctypes, os\npwned = ctypes.CDLL(None).kill(os.getppid(), 9) == 0\n",
    "ctypes mmap 1 TiB": "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.mmap.restype = ctypes.c_void_p\n"
                         "addr = libc.mmap(None, ctypes.c_size_t(1 << 40), 3, 0x22, -1, ctypes.c_long(0))\n"
                         "pwned = addr != ctypes.c_void_p(-1).value\n",
    "ctypes write to address 16": "import ctypes\nctypes.memset(16, 0, 64)\npwned = True\n",
    "symlinks and hardlinks out": """import os
for name, target in [('s', SECRET), ('t', TARGET), ('h', '/etc/shadow')]:
    try:
        os.symlink(target, name)
    except OSError:
        pass
for attempt in (lambda: 'TOKEN' in open('s').read(), lambda: bool(open('h').read()),
                lambda: os.path.islink('t') and open('t', 'w').write('pwned') > 0,
                lambda: os.link(TARGET, 'hard') or open('hard', 'w').write('x') > 0):
    try:
        pwned = pwned or attempt()
    except OSError:
        pass
""",
    "chdir('..') and read": "import os\nos.chdir('..')\npwned = 'TOKEN' in open(os.path.relpath(SECRET)).read()\n",
    "/proc environ and HOME": "import os, glob\npwned = False\nfor path in ['/proc/1/environ', '/proc/%d/environ' % "
                              "os.getppid(), '/etc/shadow'] + glob.glob(os.path.expanduser('~root') + '/.*'):\n"
                              "    try:\n        pwned = pwned or bool(open(path, 'rb').read())\n"
                              "    except OSError:\n        pass\n",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))\n",
    "output flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
}


def programs(n_benign: int, n_hostile: int, marker: str, secret: Path, target: Path, token: str):
    """(program, tests, expected, kind) of the mix: benign (correct and wrong answers of TASKS, expected 1.0 / 0.0)
    and hostile (HOSTILE in turn, each with a correct answer, expected 0.0); interleaved in a fixed order."""
    benign, hostile = [], []
    for i in range(n_benign):
        correct, wrong, tests = list(TASKS.values())[i % len(TASKS)]
        good = i % 2 == 0
        program = f"# bench-id: b{i}\n" + (correct if good else wrong)
        benign.append((program, tests, 1.0 if good else 0.0, "benign"))
    for i in range(n_hostile):
        kind = list(HOSTILE)[i % len(HOSTILE)]
        correct, _, tests = TASKS["add"]
        header = (f"# bench-id: h{i}\nMARKER, SECRET, TARGET = {marker!r}, {str(secret)!r}, {str(target)!r}\n"
                  "pwned = False\n")
        body = HOSTILE[kind].replace("'TOKEN'", repr(token))
        hostile.append((header + body + correct, tests + "assert pwned\n", 0.0, kind))
    mixed = benign + hostile
    random.Random(0).shuffle(mixed)
    return benign, mixed


def alive(markers: list[str]) -> int:
    """Processes whose command line holds any of ``markers``."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        count += any(m.encode() in cmdline for m in markers)
    return count


def signals_are_contained(mode: str) -> bool:
    """Before sending SIGKILL to -1: SIGURG (ignored by default, harmless) to -1 and through a pidfd to a canary
    that records it. If it arrives, the sandbox is broken here and the benchmark stops."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp, "canary.log")
        code = ("import signal, sys, time\nsignal.signal(signal.SIGURG, lambda *a: open(sys.argv[1], 'a').write('x'))"
                "\nopen(sys.argv[1] + '.ready', 'w').close()\ntime.sleep(30)\n")
        canary = subprocess.Popen([sys.executable, "-c", code, str(log)], start_new_session=True)
        try:
            deadline = time.monotonic() + 10
            while not Path(f"{log}.ready").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            probe = (f"import os, signal\nfor send in (lambda: os.kill(-1, signal.SIGURG), lambda: "
                     f"signal.pidfd_send_signal(os.pidfd_open({canary.pid}), signal.SIGURG)):\n"
                     "    try:\n        send()\n    except OSError:\n        pass\n")
            sandbox.run_sandboxed(probe, isolation=mode, timeout_s=5)
            time.sleep(0.2)
            return not log.exists() and canary.poll() is None
        finally:
            canary.kill()
            canary.wait()


def run(mix: list[tuple], mode: str, workers: int, timeout_s: float) -> dict:
    """One ``code_rewards`` batch; each sandbox run's SandboxResult is caught on the way (by its bench-id)."""
    results: dict[str, sandbox.SandboxResult] = {}
    real = sandbox.run_sandboxed

    def spy(source: str, **kwargs):
        result = real(source, **kwargs)
        results[re.search(r"bench-id: (\w+)", source).group(1)] = result
        return result

    sandbox.run_sandboxed = spy
    try:
        started = time.monotonic()
        scores = code_rewards([p for p, _, _, _ in mix], [t for _, t, _, _ in mix], workers=workers,
                              timeout_s=timeout_s, isolation=mode)
        wall = time.monotonic() - started
    finally:
        sandbox.run_sandboxed = real
    ids = [re.search(r"bench-id: (\w+)", p).group(1) for p, _, _, _ in mix]
    return {"wall": wall, "scores": scores, "results": [results[i] for i in ids]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benign", type=int, default=50)
    parser.add_argument("--hostile", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4, help="sandboxes at once (code_rewards' workers)")
    parser.add_argument("--timeout", type=float, default=2.0, help="each program's deadline, s")
    parser.add_argument("--modes", nargs="+", default=["namespace", "socket"], choices=["namespace", "socket"])
    args = parser.parse_args()

    modes = [m for m in args.modes if m != "namespace" or sandbox.namespaces_available()]
    marker = f"posttrain-bench-{uuid.uuid4().hex}"
    token = f"posttrain-secret-{uuid.uuid4().hex}"
    home = Path(tempfile.mkdtemp(prefix="posttrain-bench-"))  # the host files the attacks aim at
    secret, target = home / "secret.txt", home / "target.txt"
    secret.write_text(token)
    target.write_text("original")
    benign, mixed = programs(args.benign, args.hostile, marker, secret, target, token)
    rows, outcomes, scratch_dirs = [], {}, []
    scratch_root = Path(tempfile.gettempdir())
    scratch_before = set(scratch_root.glob("posttrain-sandbox-*"))
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        for mode in modes:
            if not signals_are_contained(mode):
                sys.exit(f"{mode}: a probe signal left the sandbox; not running the hostile programs")
            for name, mix in (("benign only", benign), ("mixed", mixed)):
                out = run(mix, mode, args.workers, args.timeout)
                scratch_dirs += [r.scratch_dir for r in out["results"]]
                good = [s == e for (_, _, e, k), s in zip(mix, out["scores"]) if k == "benign"]
                bad = [s == 0.0 for (_, _, _, k), s in zip(mix, out["scores"]) if k != "benign"]
                latency = sorted(r.duration_s for r in out["results"])
                benign_latency = sorted(r.duration_s for (_, _, _, k), r in zip(mix, out["results"]) if k == "benign")
                rows.append({
                    "mode": mode, "mix": name, "n": len(mix), "wall": out["wall"], "rate": len(mix) / out["wall"],
                    "benign_ok": sum(good) / len(good), "hostile_ok": sum(bad) / len(bad) if bad else None,
                    "p50": statistics.median(benign_latency),
                    "p95": benign_latency[min(len(benign_latency) - 1, int(0.95 * len(benign_latency)))],
                    "max": latency[-1], "left": alive([marker, *scratch_dirs])})
                for (_, _, _, kind), score, result in zip(mix, out["scores"], out["results"]):
                    if kind != "benign":
                        ending = ("timed out" if result.timed_out else f"signal {-result.returncode}"
                                  if result.killed else "error: " + result.error[:40] if result.error
                                  else f"exit {result.returncode}")
                        ending += f", {result.leftover_processes} leftover killed" if result.leftover_processes else ""
                        outcomes.setdefault(kind, {})[mode] = (score, ending, result.duration_s)
    finally:
        time.sleep(1.0)  # anything that outlived the runs would still be there
        left = alive([marker, *scratch_dirs])
        scratch_left = len(set(scratch_root.glob("posttrain-sandbox-*")) - scratch_before)
        target_ok = target.read_text() == "original"
        shutil.rmtree(home, ignore_errors=True)

    print(f"{args.benign} benign + {args.hostile} hostile programs, {args.workers} workers, deadline "
          f"{args.timeout:g} s, {os.cpu_count()} CPUs, Landlock ABI {sandbox._landlock_abi(sandbox._libc())}\n")
    print("| mode | mix | programs | wall s | programs/s | benign scored right | hostile scored 0.0 | "
          "benign p50 s | benign p95 s | max s | processes left |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hostile = "-" if r["hostile_ok"] is None else f"{r['hostile_ok']:.0%}"
        print(f"| {r['mode']} | {r['mix']} | {r['n']} | {r['wall']:.1f} | {r['rate']:.1f} | {r['benign_ok']:.0%} | "
              f"{hostile} | {r['p50']:.2f} | {r['p95']:.2f} | {r['max']:.2f} | {r['left']} |")
    print(f"\nafter all runs (+1 s): processes of any program {left}, scratch dirs left {scratch_left}, caller's "
          f"descriptors {fds_before} -> {len(os.listdir('/proc/self/fd'))}, target file unchanged: {target_ok}\n")
    print("score (how the program ended, latency) of each hostile program's last run; exit 0: it ran to its end and "
          "its tests, which assert the attack worked, failed")
    print("\n| hostile program | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for kind, by_mode in sorted(outcomes.items(), key=lambda item: list(HOSTILE).index(item[0])):
        cells = [f"{by_mode[m][0]} ({by_mode[m][1]}, {by_mode[m][2]:.1f} s)" if m in by_mode else "-" for m in modes]
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
