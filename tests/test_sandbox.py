"""The code sandbox (posttrain.rewards.sandbox) and code_reward: correct, wrong and partially correct programs, and
the attacks of docs/verifiers.md (infinite loop, fork bomb, memory bomb, network, writes outside the scratch
directory, the parent's secrets, an output flood, a child that outlives its parent; then, from "Hostile programs"
on, escapes through links and chdir, the machine's files, background processes, sleeping past the deadline, ctypes,
file descriptor exhaustion, signals to and limits of the parent, a killed or crippled supervisor, undoing the
fallback's guard), each in both isolation modes: the namespace sandbox (skipped where unavailable) and the
socket-blocking fallback, forced so it is tested here too.

Each hostile program goes through the code verifier, whose tests assert that the attack *worked*: a score of 0.0
means it did not (or the program was killed), and each test also checks containment from outside (the host's
files, the process table, the caller's descriptors, a canary process)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from posttrain.rewards import sandbox
from posttrain.rewards.sandbox import namespaces_available, run_sandboxed
from posttrain.verifiers import code_reward, code_rewards

LANDLOCK_ABI = sandbox._landlock_abi(sandbox._libc())  # 0: the fallback has only its Python-level audit hook

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\nassert add(0, 0) == 0\n"


@pytest.fixture(params=["namespace", "socket"])
def isolation(request):
    if request.param == "namespace" and not namespaces_available():
        pytest.skip("user/network/pid/mount namespaces are not available here (unshare failed)")
    return request.param


@pytest.fixture(params=["namespace", "socket", "socket, hook only"])
def layered_isolation(request, monkeypatch):
    """``isolation``, plus the fallback without Landlock (what a kernel without it, or before its signal scope,
    gets): its audit hook alone."""
    if request.param == "namespace" and not namespaces_available():
        pytest.skip("user/network/pid/mount namespaces are not available here (unshare failed)")
    if request.param == "socket, hook only":
        monkeypatch.setattr(sandbox, "LANDLOCK", False)
    return request.param.split(",")[0]


def _alive(marker: str) -> list[int]:
    """Processes whose command line contains ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_isolation_mode_is_reported(isolation):
    result = run_sandboxed("print('hi')", isolation=isolation, timeout_s=5)
    assert result.ok and result.stdout == "hi\n"
    assert result.network_isolation == {"namespace": "netns", "socket": "socket-blocked"}[isolation]
    fallback = "landlock" if LANDLOCK_ABI else "python-guard"
    assert result.filesystem == {"namespace": "read-only", "socket": fallback}[isolation]
    assert not os.path.exists(result.scratch_dir)  # removed afterwards


def test_environment_cwd_and_stdin(isolation, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_SECRET", "s3cr3t-env")
    program = ("import os, sys\nprint(sorted(os.environ))\nprint(os.getcwd() == os.environ['HOME'] == "
               "os.environ['TMPDIR'])\nprint(repr(sys.stdin.read()))\nprint(hash('a') == hash('a'), sys.flags.no_site)")
    result = run_sandboxed(program, isolation=isolation, timeout_s=5)
    lines = result.stdout.splitlines()
    assert lines[0] == str(sorted(["HOME", "LANG", "PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED", "TMPDIR"]))
    assert lines[1:] == ["True", "''", "True 1"]


def test_correct_wrong_and_partial(isolation):
    assert code_reward(ADD, ADD_TESTS, isolation=isolation) == 1.0
    wrong = "def add(a, b):\n    return a - b\n"  # passes add(-1, 1)? no: -2; passes add(0, 0) only
    assert code_reward(wrong, ADD_TESTS, isolation=isolation) == 0.0
    assert code_reward(wrong, ADD_TESTS, partial_credit=True, isolation=isolation) == 0.25
    half = "def add(a, b):\n    return a + b if a >= 0 else 99\n"  # fails add(-1, 1) only
    assert code_reward(half, ADD_TESTS, partial_credit=True, isolation=isolation) == 0.75
    assert code_reward(half, ADD_TESTS, isolation=isolation) == 0.0


def test_program_errors_and_bad_tests(isolation):
    assert code_reward("def add(a, b) return a + b", ADD_TESTS, isolation=isolation) == 0.0  # syntax error
    assert code_reward("raise ValueError('no')", "assert True", isolation=isolation) == 0.0
    assert code_reward("import sys\n" + ADD + "sys.exit(0)", ADD_TESTS, isolation=isolation) == 1.0  # exit 0 is ok
    assert code_reward("import sys\nsys.exit(2)", "assert True", isolation=isolation) == 0.0
    assert code_reward(ADD, "assert add(1, 2) ==", isolation=isolation) is None  # tests do not parse
    assert code_reward(ADD, "# only a comment", isolation=isolation) is None
    assert code_reward(ADD, "x = add(1, 2)\nassert x == 3\nundefined_name", isolation=isolation) == 0.0
    assert code_reward(ADD, "x = add(1, 2)\nassert x == 3\nundefined_name", partial_credit=True,
                       isolation=isolation) == 1.0  # only asserts count


@pytest.mark.parametrize("hack", [
    "import builtins\nbuiltins.exec = lambda *a, **k: None\n",  # skip the tests' exec
    "import builtins\nbuiltins.compile = lambda *a, **k: compile('pass', 'x', 'exec')\n",  # compile them to nothing
    "__builtins__['exec'] = lambda *a, **k: None\n",
    "import ast\nast.parse = lambda *a, **k: ast.Module([], [])\n",  # parse the tests to no statement
    "import os\nos._exit(0)\n",  # leave before the tests, exit code 0
    "import json\njson.dumps = lambda *a, **k: '{\"program\": true, \"asserts\": 4, \"passed\": 4, \"all\": true}'\n",
    # read the result tag's nonce from the running script and forge the line: the script is unlinked first
    "import os, re, sys\ntry:\n    source = open(sys.argv[0]).read()\nexcept OSError:\n    source = ''\n"
    "tag = re.search(r'__posttrain_tests__-[0-9a-f]{16}', source)\nif tag:\n"
    "    print('\\n' + tag.group() + ' {\"program\": true, \"statements\": 4, \"asserts\": 4, \"passed\": 4, "
    "\"all\": true}', flush=True)\n    os._exit(0)\n",
    # empty the harness's list of test statements through the garbage collector: the caller counts them
    "import ast, gc\nfor o in gc.get_objects():\n"
    "    if type(o) is list and o and all(isinstance(x, ast.stmt) for x in o):\n"
    "        o.clear()\n",
])
def test_program_cannot_skip_the_tests_by_patching_the_harness(isolation, hack):
    """Reward hacking by monkeypatching what the harness calls after the program: bound before the program runs."""
    program = hack + "def add(a, b):\n    return 0\n"
    assert code_reward(program, ADD_TESTS, isolation=isolation) == 0.0
    # add = 0 passes add(-1, 1) == 0 and add(0, 0) == 0 only: 0.5 when the tests run, 0.0 when the program left early
    partial = code_reward(program, ADD_TESTS, partial_credit=True, isolation=isolation)
    assert partial == (0.0 if hack.startswith("import os\n") or "gc" in hack else 0.5)


def test_tests_see_pristine_builtins(isolation):
    """A program that patches a builtin the tests use does not change what the tests compute."""
    program = "__builtins__['len'] = lambda x: 2\ndef f():\n    return 'abc'\n"
    assert code_reward(program, "assert len(f()) == 2\n", isolation=isolation) == 0.0
    assert code_reward(program, "assert len(f()) == 3\n", isolation=isolation) == 1.0


def test_program_output_does_not_hide_the_result(isolation):
    chatty = "print('x' * 500_000)\n" + ADD  # more than the output cap: the result line is in the kept tail
    assert code_reward(chatty, ADD_TESTS, isolation=isolation) == 1.0


def test_infinite_loop(isolation):
    started = time.monotonic()
    assert code_reward("while True:\n    pass", "assert True", timeout_s=1.0, isolation=isolation) == 0.0
    assert time.monotonic() - started < 1.0 + 2.0
    result = run_sandboxed("while True:\n    pass", timeout_s=1.0, isolation=isolation)
    assert result.timed_out and result.killed and result.error is None


def test_fork_bomb(isolation):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    started = time.monotonic()
    result = run_sandboxed(bomb, timeout_s=1.5, isolation=isolation, max_processes=32)
    assert time.monotonic() - started < 1.5 + 3.0
    assert result.timed_out
    assert _alive(result.scratch_dir) == []  # nothing of it left (the bomb's command line names the scratch dir)
    assert run_sandboxed("print(1 + 1)", isolation=isolation, timeout_s=5).stdout == "2\n"  # the machine is fine


def test_memory_bomb(isolation):
    started = time.monotonic()
    bomb = "blocks = []\nwhile True:\n    blocks.append(bytearray(10 ** 7))\n"
    result = run_sandboxed(bomb, timeout_s=5, memory_mb=256, isolation=isolation)
    assert time.monotonic() - started < 5
    assert result.returncode != 0 and "MemoryError" in result.stderr
    assert code_reward("x = bytearray(10 ** 10)", "assert True", memory_mb=256, isolation=isolation) == 0.0


def test_network(isolation):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    program = (
        "import socket\nconnected = []\n"
        f"for host, port in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 80)]:\n"
        "    try:\n        socket.create_connection((host, port), timeout=1).close()\n        connected.append(host)\n"
        "    except Exception as error:\n        print('blocked', host, repr(error))\n"
        "try:\n    s = socket.socket()\n    s.settimeout(1)\n"
        f"    s.connect(('127.0.0.1', {port}))\n    connected.append('raw')\n"
        "except Exception as error:\n    print('blocked raw', repr(error))\n"
        "try:\n    socket.getaddrinfo('example.com', 80)\n    connected.append('dns')\n"
        "except Exception as error:\n    print('blocked dns', repr(error))\n")
    try:
        assert code_reward(program, "assert '127.0.0.1' in connected", isolation=isolation) == 0.0
        assert code_reward(program, "assert 'raw' in connected", isolation=isolation) == 0.0
        assert code_reward(program, "assert connected == []", isolation=isolation) == 1.0
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()


def test_writes_outside_the_scratch_dir(isolation, tmp_path):
    token = uuid.uuid4().hex
    targets = [tmp_path / f"escape-{token}.txt", Path.home() / f"posttrain-escape-{token}.txt"]
    program = ("import os, pathlib\nwritten = []\n"
               f"for path in {[str(t) for t in targets]!r}:\n"
               "    for write in (lambda p: open(p, 'w').write('x'), lambda p: pathlib.Path(p).write_text('x'),\n"
               "                  lambda p: os.mkdir(p + '.d'),\n"
               "                  lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY))):\n"
               "        try:\n            write(path)\n            written.append(path)\n"
               "        except OSError as error:\n            print('refused', repr(error))\n"
               "open('inside.txt', 'w').write('fine')\n")
    try:
        assert code_reward(program, "assert written == []\nassert open('inside.txt').read() == 'fine'",
                           isolation=isolation) == 1.0
        for target in targets:
            assert not target.exists() and not Path(f"{target}.d").exists()
    finally:
        for target in targets:
            target.unlink(missing_ok=True)
            if Path(f"{target}.d").is_dir():
                Path(f"{target}.d").rmdir()


def test_parent_secrets(isolation, monkeypatch):
    """The secret is in the parent's os.environ and in the launch environment of a same-user process (whose
    /proc/PID/environ holds it); the program looks in os.environ, /proc/PPID/environ and every /proc/*/environ."""
    secret = f"posttrain-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("POSTTRAIN_SECRET", secret)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                              env={**os.environ, "POSTTRAIN_SECRET": secret})
    program = ("import os\nfound = [os.environ.get('POSTTRAIN_SECRET', '')]\n"
               "for path in ['/proc/%d/environ' % os.getppid(), '/proc/1/environ'] + "
               "['/proc/%s/environ' % p for p in os.listdir('/proc') if p.isdigit()]:\n"
               "    try:\n        found.append(open(path, 'rb').read().decode(errors='replace'))\n"
               "    except OSError:\n        pass\n"
               "print('\\n'.join(found))\n")
    try:
        time.sleep(0.1)  # the holder has started
        assert secret.encode() in open(f"/proc/{holder.pid}/environ", "rb").read()  # the test can find it
        assert code_reward(program, f"assert any({secret!r} in text for text in found)", isolation=isolation) == 0.0
        result = run_sandboxed(program, isolation=isolation, timeout_s=10)
        assert result.error is None and secret not in result.stdout and secret not in result.stderr
    finally:
        holder.kill()
        holder.wait()


def test_output_flood(isolation):
    forever = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    result = run_sandboxed(forever, timeout_s=1.0, isolation=isolation, max_output_bytes=10_000)
    assert result.timed_out and result.stdout_bytes > 10_000
    assert len(result.stdout) < 10_000 + 100 and "bytes omitted" in result.stdout
    gigabyte = "import sys\nfor _ in range(1024):\n    sys.stdout.buffer.write(b'y' * 2 ** 20)\n"
    result = run_sandboxed(gigabyte, timeout_s=5.0, isolation=isolation, max_output_bytes=10_000)
    assert len(result.stdout) < 10_000 + 100
    to_disk = "f = open('big', 'wb')\nfor _ in range(1024):\n    f.write(b'0' * 2 ** 20)\n"
    result = run_sandboxed(to_disk, timeout_s=5.0, isolation=isolation, disk_mb=16)
    assert result.returncode != 0 and ("File too large" in result.stderr or "No space left" in result.stderr)


def test_child_that_outlives_its_parent(isolation):
    marker = f"posttrain-orphan-{uuid.uuid4().hex}"
    program = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n"
               "    os._exit(0)\nos.waitpid(pid, 0)\nprint('spawned', flush=True)\n")
    started = time.monotonic()
    result = run_sandboxed(program, isolation=isolation, timeout_s=10)
    assert time.monotonic() - started < 5  # the sweep does not wait for the sleeper
    if isolation == "namespace":
        assert result.stdout == "spawned\n"  # it did escape its group and session...
    else:
        assert "os.fork is not allowed" in result.stderr  # the fallback refuses to start processes
    assert _alive(marker) == []  # ...and is gone all the same
    assert result.leftover_processes == (1 if isolation == "namespace" else 0)
    assert code_reward(program, "assert True", isolation=isolation) == 0.0  # leaving a process running scores 0
    assert _alive(marker) == []


def test_many_rewards_in_parallel(isolation):
    """Training goes on: many sandboxes at once from threads, right and wrong answers in their places."""
    programs = [ADD, "def add(a, b):\n    return a * b\n"] * 6
    expected = [1.0, 0.0] * 6
    assert code_rewards(programs, [ADD_TESTS] * 12, workers=4, isolation=isolation) == expected
    with ThreadPoolExecutor(max_workers=3) as pool:
        scores = list(pool.map(lambda p: code_reward(p, ADD_TESTS, isolation=isolation), programs))
    assert scores == expected
    with pytest.raises(ValueError, match="2 programs but 1 test sources"):
        code_rewards([ADD, ADD], [ADD_TESTS])


def test_sandbox_failure_is_none(monkeypatch):
    """When the sandbox itself cannot run, the program is not judged."""
    import posttrain.rewards.sandbox as sandbox

    monkeypatch.setattr(sandbox.sys, "executable", "/nonexistent/python")
    result = sandbox.run_sandboxed("print(1)", isolation="socket", timeout_s=5)
    assert result.error is not None and result.returncode is None
    assert code_reward(ADD, ADD_TESTS, isolation="socket") is None


# ----------------------------------------------------------------------------------------------------------------
# Hostile programs: each scored through code_reward (its tests assert the attack worked) and checked from outside


@pytest.fixture
def judge(monkeypatch):
    """``code_reward`` that also returns the SandboxResult it judged (whose scratch_dir is in the command line of
    every process running the program: the marker for leftovers)."""
    results = []
    real = sandbox.run_sandboxed

    def spy(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(sandbox, "run_sandboxed", spy)

    def judge(program: str, tests: str, **kwargs):
        return code_reward(program, tests, isolation=kwargs.pop("isolation"), **kwargs), results[-1]

    return judge


def _seen(result) -> dict:
    """The ``SEEN {json}`` line a probing program prints."""
    lines = [line for line in result.stdout.splitlines() if line.startswith("SEEN ")]
    assert lines, result.stdout + result.stderr
    return json.loads(lines[-1][len("SEEN "):])


PROBE = '''import json, os
seen, wrote = {}, []

def attempt(name, action):
    try:
        seen[name] = str(action())[:300]
    except Exception as error:
        seen[name] = "refused: " + repr(error)

def read(path, dir_fd=None):
    with open(os.open(path, os.O_RDONLY, dir_fd=dir_fd)) as handle:
        return handle.read()

def write(path, dir_fd=None):
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd), "w") as handle:
        handle.write("pwned")
    wrote.append(path)
    return "written"

def write_link(link):  # only through a link the program made (else it would just create a file of its own)
    if not os.path.lexists(link):
        raise FileNotFoundError(link)
    return write(link)

scratch = os.getcwd()
from_parent = lambda path: os.path.relpath(path, os.path.dirname(scratch))  # a path as seen from scratch/..
'''


@pytest.fixture
def host_files(tmp_path):
    """Files of the caller outside the scratch dir: a world-readable secret, a 0600 key, a file to overwrite and a
    path to create (in the temp root, as the caller's own temporary files are)."""
    token = f"posttrain-secret-{uuid.uuid4().hex}"
    files = {"secret": tmp_path / "secret.txt", "key": tmp_path / "private.key", "target": tmp_path / "target.txt",
             "new": tmp_path / "created-by-the-program.txt"}
    files["secret"].write_text(token)
    files["key"].write_text(token)
    files["key"].chmod(0o600)
    files["target"].write_text("original")
    return token, {name: str(path) for name, path in files.items()}


def test_escape_through_links_and_chdir(layered_isolation, judge, host_files):
    """Symlinks to /etc/passwd, /etc/shadow, the caller's secret, a file to overwrite, a path to create and the
    parent directory (one made from a deeper cwd too); hardlinks to the secret and the file; a descriptor of / as
    dir_fd; os.chdir('..'): nothing secret is read, nothing outside is written."""
    isolation = layered_isolation
    token, files = host_files
    program = (f"SECRET, KEY, TARGET, NEW = {files['secret']!r}, {files['key']!r}, {files['target']!r}, "
               f"{files['new']!r}\n" + PROBE + '''
for name, target in [("passwd", "/etc/passwd"), ("shadow", "/etc/shadow"), ("secret", SECRET), ("key", KEY),
                     ("target", TARGET), ("new", NEW), ("parent", "..")]:
    attempt("symlink " + name, lambda: os.symlink(target, "link-" + name))
for name in ("passwd", "shadow", "secret", "key"):
    attempt("read link " + name, lambda: read("link-" + name))
attempt("read through parent", lambda: read(os.path.join("link-parent", from_parent(SECRET))))
attempt("write link target", lambda: write_link("link-target"))
attempt("write link new", lambda: write_link("link-new"))
attempt("write through parent", lambda: write(os.path.join("link-parent", from_parent(NEW))))
for name, source in [("secret", SECRET), ("key", KEY), ("target", TARGET)]:
    attempt("hardlink " + name, lambda: os.link(source, "hard-" + name))
attempt("read hardlink", lambda: read("hard-secret") + read("hard-key"))
attempt("write hardlink", lambda: write_link("hard-target"))
attempt("read through a descriptor of /", lambda: read(SECRET.lstrip("/"), dir_fd=os.open("/", os.O_RDONLY)))
attempt("write through a descriptor of /", lambda: write(NEW.lstrip("/"), dir_fd=os.open("/", os.O_RDONLY)))
os.makedirs("d1/d2")
os.chdir("d1/d2")  # "../.." from here is inside; from the link's own directory (scratch) it is outside
attempt("symlink up from a deeper cwd", lambda: os.symlink("../..", scratch + "/link-up"))
attempt("write link up", lambda: write_link(os.path.join(scratch, "link-up", NEW.lstrip("/"))))  # link-up is /
os.chdir(scratch)
os.chdir("..")
attempt("read after chdir", lambda: read(from_parent(SECRET)) + read(from_parent(KEY)))
attempt("write after chdir", lambda: write(from_parent(NEW)))
os.chdir(scratch)
print("SEEN " + json.dumps(seen), flush=True)
''')
    score, result = judge(program, f"assert wrote or any({token!r} in v for v in seen.values())",
                          isolation=isolation)
    assert score == 0.0 and result.error is None and result.returncode == 0
    seen = _seen(result)
    assert not any(token in value for value in seen.values())
    with open("/etc/passwd") as handle:  # refused, or what any user may read anyway
        assert seen["read link passwd"].startswith("refused: ") or seen["read link passwd"] == handle.read()[:300]
    assert seen["read link shadow"].startswith("refused: ")
    if isolation == "socket":  # namespace mode may make it: the mounts are read-only
        assert seen["symlink up from a deeper cwd"].startswith("refused: ")
    assert all(value.startswith("refused: ") for name, value in seen.items() if name.startswith("write"))
    assert Path(files["target"]).read_text() == "original" and not Path(files["new"]).exists()


def test_escape_the_audit_hook_cannot_see(isolation, judge, host_files):
    """A directory descriptor inside the scratch dir and a different current directory: the fallback's hook checks
    ``../x`` against the cwd (inside), the kernel resolves it from the descriptor (outside). Only a kernel layer
    (namespace mode's read-only mounts, the fallback's Landlock rules) stops it."""
    if isolation == "socket" and not LANDLOCK_ABI:
        pytest.skip("no Landlock in this kernel: the fallback's path checks are Python-level (docs/verifiers.md)")
    token, files = host_files
    program = f"SECRET, NEW = {files['secret']!r}, {files['new']!r}\n" + PROBE + '''
os.makedirs("a/b")
fd = os.open(".", os.O_RDONLY)  # the scratch dir
os.chdir("a/b")
attempt("read", lambda: read("../" + from_parent(SECRET), dir_fd=fd))
attempt("write", lambda: write("../" + from_parent(NEW), dir_fd=fd))
print("SEEN " + json.dumps(seen), flush=True)
'''
    score, result = judge(program, f"assert wrote or {token!r} in seen['read']", isolation=isolation)
    assert score == 0.0
    seen = _seen(result)
    assert seen["read"].startswith("refused: ") and seen["write"].startswith("refused: ")
    if isolation == "socket":
        assert seen["write"].startswith("refused: PermissionError(13")  # the kernel's (Landlock), not the hook's
    assert not Path(files["new"]).exists()


ESCAPE = """import json, os
seen = {}
for name, path in [("secret", SECRET), ("shadow", "/etc/shadow")]:
    try:
        seen[name] = open(path).read()[:100]
    except Exception as error:
        seen[name] = "refused: " + repr(error)
try:
    open(NEW, "w").write("pwned")
    seen["write"] = "written"
except Exception as error:
    seen["write"] = "refused: " + repr(error)
print("SEEN " + json.dumps(seen), flush=True)
"""

UNDO_THE_GUARD = {  # each prepares the ground, then ``run(ESCAPE)`` reads the secrets and writes outside
    "a subinterpreter (no audit hooks)": "import _xxsubinterpreters as si\nrun = lambda code: si.run_string("
                                         "si.create(), code)\n",
    "_testcapi.run_in_subinterp": "import _testcapi\nrun = _testcapi.run_in_subinterp\n",
    "the guard's functions emptied through a traceback": """
def empty_code(function):  # a body that does nothing, with the free variables __code__ insists on
    names = function.__code__.co_freevars
    source = ("def outer():\\n" + "".join(f"    {n} = None\\n" for n in names) + "    def inner(*args, **kwargs):\\n"
              + (f"        {', '.join(names)}\\n" if names else "") + "        return None\\n    return inner\\n")
    space = {}
    exec(source, space)
    return space["outer"]().__code__
try:
    open("/etc/shadow")
except OSError as error:
    tb = error.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if type(value) is type(empty_code) and value is not empty_code:
                value.__code__ = empty_code(value)
        tb = tb.tb_next
""",
    "the hook's closure reached through gc": """
import gc
for hook in [o for o in gc.get_objects() if type(o) is type(lambda: 0) and o.__name__ == "hook"]:
    for cell in hook.__closure__ or ():
        if type(cell.cell_contents) is type(lambda: 0) and cell.cell_contents.__name__ == "deny":
            cell.cell_contents = lambda *args: None
""",
    "a tracer writing into a refusal's frame": """
import sys, _posixsubprocess
def tracer(frame, event, arg):
    if "deny" in frame.f_locals:
        frame.f_locals["deny"] = lambda *args: None  # written back into the cell the hook shares
    return tracer
sys.settrace(tracer)
try:
    _posixsubprocess.fork_exec()
except Exception:
    pass
sys.settrace(None)
""",
    "posixpath patched": "import os, posixpath\nposixpath._joinrealpath = lambda *args: (os.getcwd() + '/x', True)\n"
                         "posixpath.realpath = lambda *args, **kwargs: os.getcwd() + '/x'\n",
    "builtins replaced": "import builtins, json, os\nbuiltins.any = lambda *args: False\n"
                         "builtins.bool = lambda *args: True\n",
}


@pytest.mark.parametrize("attack", list(UNDO_THE_GUARD))
def test_undoing_the_fallbacks_guard(layered_isolation, host_files, attack):
    """Known ways to switch off a Python audit hook, then reads of the caller's secret and /etc/shadow and a write
    outside: all refused. In the fallback each way is refused itself (or changes nothing the hook uses); with
    Landlock only /etc/shadow (root's, in a readable directory) depends on the hook; namespace mode has no hook to
    undo. The closure cells of the guard's functions stay writable (docs/verifiers.md): not tested here."""
    isolation = layered_isolation
    token, files = host_files
    escape = f"SECRET, NEW = {files['secret']!r}, {files['new']!r}\n" + ESCAPE
    program = (f"ESCAPE = {escape!r}\nrun = exec\ntry:\n"
               + "".join(f"    {line}\n" for line in UNDO_THE_GUARD[attack].strip().splitlines())
               + "except Exception as error:\n    print('refused', repr(error))\nrun(ESCAPE)\n")
    result = run_sandboxed(program, isolation=isolation, timeout_s=10)
    assert result.error is None
    seen = _seen(result)
    assert all(value.startswith("refused: ") for value in seen.values()), seen
    assert token not in result.stdout + result.stderr and not Path(files["new"]).exists()


def test_reading_the_machines_files(layered_isolation, judge, monkeypatch):
    """The caller's secret by absolute path (world-readable and 0600, in the temp root), an ssh-like key in the
    caller's HOME, /etc/shadow, and the caller's environment (os.environ, /proc/1/environ, /proc/PPID/environ, the
    launch environment of a process of the caller's holding the secret). HOME and the temp root are fresh
    directories side by side (the sandbox reads $HOME and tempfile.gettempdir()): nothing is written to the real
    HOME, and HOME is hidden as HOME, not as a part of the temp root."""
    isolation = layered_isolation
    token = f"posttrain-secret-{uuid.uuid4().hex}"
    home, temp_root = Path(tempfile.mkdtemp(prefix="posttrain-home-")), Path(tempfile.mkdtemp(prefix="posttrain-tmp-"))
    monkeypatch.setenv("POSTTRAIN_SECRET", token)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))  # the scratch dirs too
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                              env={**os.environ, "POSTTRAIN_SECRET": token})
    try:
        secret, key, ssh = temp_root / "secret.txt", temp_root / "private.key", home / ".ssh"
        secret.write_text(token)
        key.write_text(token)
        key.chmod(0o600)
        ssh.mkdir(mode=0o700)
        (ssh / "id_ed25519").write_text(token)
        (ssh / "id_ed25519").chmod(0o600)
        (ssh / "config").write_text(token)  # world-readable, in a directory only its owner may enter
        paths = [str(secret), str(key), str(ssh / "id_ed25519"), str(ssh / "config"), "/etc/shadow",
                 "/proc/1/environ", f"/proc/{holder.pid}/environ"]
        program = f"PATHS = {paths!r}\n" + PROBE + '''
for path in PATHS + ["/proc/%d/environ" % os.getppid()]:
    attempt(path, lambda: read(path))
attempt("environ", lambda: dict(os.environ))
attempt("home", lambda: os.listdir(os.path.dirname(PATHS[2])))
print("SEEN " + json.dumps(seen), flush=True)
'''
        time.sleep(0.1)  # the holder has started
        score, result = judge(program, f"assert any({token!r} in v for v in seen.values())", isolation=isolation)
        assert score == 0.0 and result.error is None, result
        seen = _seen(result)
        assert not any(token in value for value in seen.values())
        assert all(seen[path].startswith("refused: ") for path in paths)
        assert token not in result.stdout + result.stderr
    finally:
        holder.kill()
        holder.wait()
        shutil.rmtree(home)
        shutil.rmtree(temp_root)


WRITE_LATER = ("import os, sys, time\n\ndef write_later(paths):\n    time.sleep(0.6)\n    for path in paths:\n"
               "        try:\n            os.makedirs(os.path.dirname(path), exist_ok=True)\n"
               "            open(path, 'w').write('late')\n        except OSError:\n            pass\n")

BACKGROUND = {  # LATER: a command that runs write_later(PATHS) with the marker in its command line
    "fork, setsid, double fork": "pid = os.fork()\nif pid == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                                 "        os.execv(sys.executable, LATER)\n    os._exit(0)\nos.waitpid(pid, 0)\n",
    "nohup through os.system": "import shlex\nos.system('nohup ' + shlex.join(LATER) + ' >/dev/null 2>&1 &')\n",
    "subprocess in a new session": "import subprocess\nsubprocess.Popen(LATER, start_new_session=True)\n",
    "a child that ignores SIGTERM": "import signal\nif os.fork() == 0:\n    signal.signal(signal.SIGTERM, "
                                    "signal.SIG_IGN)\n    os.execv(sys.executable, LATER)\n",
    "daemon and non-daemon threads": "import threading\n"
                                     "threading.Thread(target=write_later, args=(PATHS,), daemon=True).start()\n"
                                     "threading.Thread(target=time.sleep, args=(60,)).start()\n",
}


@pytest.mark.parametrize("attack", list(BACKGROUND))
def test_background_processes_do_not_outlive_the_check(isolation, judge, tmp_path, attack):
    """After run_sandboxed returns no process of the program exists (the marker in their command lines), and the
    files they would write later (in the caller's temp dir, or the scratch dir re-created) never appear."""
    marker = f"posttrain-late-{uuid.uuid4().hex}"
    late = tmp_path / "late.txt"
    program = (WRITE_LATER + f"PATHS = [{str(late)!r}, os.getcwd() + '/late.txt']\n"
               f"LATER = [sys.executable, '-c', {WRITE_LATER!r} + 'write_later(sys.argv[1:3])', *PATHS, {marker!r}]\n"
               + BACKGROUND[attack] + ADD)
    started = time.monotonic()
    score, result = judge(program, ADD_TESTS, timeout_s=2.0, isolation=isolation)
    assert time.monotonic() - started < 2.0 + 3.0
    assert score == 0.0 and result.error is None
    if isolation == "namespace" and "threads" not in attack:
        assert result.leftover_processes >= 1  # it did start one...
    assert _alive(marker) == [] and _alive(result.scratch_dir) == []  # ...and none is left
    time.sleep(1.0)  # past the moment the background process would have written
    assert not late.exists() and not os.path.exists(result.scratch_dir)
    assert _alive(marker) == []


SLEEPERS = {
    "time.sleep": "import time\ntime.sleep(60)\n",
    "busy loop ignoring SIGXCPU": "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n"
                                  "    pass\n",
    "blocking read on a pipe": "import os\nr, w = os.pipe()\nos.read(r, 1)\n",
    "signal.pause": "import signal\nsignal.pause()\n",
    "SIGALRM re-armed, SIGTERM/SIGINT/SIGHUP ignored": (
        "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):\n"
        "    signal.signal(s, signal.SIG_IGN)\nsignal.signal(signal.SIGALRM, lambda *a: signal.alarm(1))\n"
        "signal.alarm(1)\nwhile True:\n    signal.pause()\n"),
    "SIGSTOP to itself": "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n",
}


@pytest.mark.parametrize("attack", list(SLEEPERS))
def test_sleeping_past_the_timeout(isolation, judge, attack):
    started = time.monotonic()
    score, result = judge(ADD + SLEEPERS[attack], ADD_TESTS, timeout_s=1.0, isolation=isolation)
    # the deadline plus a grace (two interpreter start-ups on a machine busy with other tests), not the 60 s sleep
    assert time.monotonic() - started < 1.0 + 6.0
    assert score == 0.0 and result.timed_out and result.killed and result.error is None
    assert _alive(result.scratch_dir) == []


CTYPES = {
    "system()": ("command = '%s -c \"import time; time.sleep(30)\" %s &' % (sys.executable, MARKER)\n"
                 "rc = libc.system(command.encode())", "assert rc == 0"),
    "fork()": ("pid = libc.fork()\nif pid == 0:\n    os.setsid()\n    time.sleep(30)\n", "assert pid > 0"),
    "kill() of the parent": ("rc = libc.kill(os.getppid(), signal.SIGKILL)", "assert rc == 0"),
    "mmap() of 1 TiB": ("libc.mmap.restype = ctypes.c_void_p\n"
                        "addr = libc.mmap(None, ctypes.c_size_t(1 << 40), 3, 0x22, -1, ctypes.c_long(0))\n"
                        "print('SEEN', json.dumps({'mapped': addr != ctypes.c_void_p(-1).value}))",
                        "assert addr != ctypes.c_void_p(-1).value"),
    "write to address 16": ("ctypes.memset(16, 0, 64)", "assert True"),
}


@pytest.mark.parametrize("attack", list(CTYPES))
def test_ctypes_into_libc(isolation, judge, attack):
    marker = f"posttrain-ctypes-{uuid.uuid4().hex}"
    code, tests = CTYPES[attack]
    program = (f"import ctypes, json, os, signal, sys, time\nMARKER = {marker!r}\nlibc = ctypes.CDLL(None)\n"
               + code + "\n" + ADD)
    score, result = judge(program, tests + "\n" + ADD_TESTS, timeout_s=5.0, isolation=isolation)
    assert score == 0.0 and result.error is None  # the supervisor reported (it was not killed)
    if isolation == "socket":
        assert "importing ctypes is not allowed" in result.stderr
    elif attack == "mmap() of 1 TiB":
        assert _seen(result) == {"mapped": False}  # RLIMIT_AS
    elif attack == "write to address 16":
        assert result.returncode == -signal.SIGSEGV and result.killed
    elif attack in ("system()", "fork()"):
        assert result.leftover_processes >= 1
    assert _alive(marker) == [] and _alive(result.scratch_dir) == []
    assert run_sandboxed("print(1 + 1)", isolation=isolation, timeout_s=5).stdout == "2\n"


FD_HOGS = {
    "open until EMFILE": "held.append(open('/dev/null'))",
    "pipes": "held.append(os.pipe())",
    "socketpairs": "held.append(socket.socketpair())",
}


@pytest.mark.parametrize("attack", list(FD_HOGS))
def test_file_descriptor_exhaustion(isolation, judge, attack):
    """The program runs out of descriptors (RLIMIT_NOFILE); the caller keeps its own: the same number open after as
    before, hundreds more can be opened, and the next sandboxed program runs."""
    before = len(os.listdir("/proc/self/fd"))
    program = ("import json, os, socket\nheld = []\ntry:\n    while True:\n        " + FD_HOGS[attack] + "\n"
               "except OSError as error:\n    print('SEEN', json.dumps({'held': len(held), 'error': repr(error)}))\n"
               + ADD)
    score, result = judge(program, "assert len(held) > 100_000\n" + ADD_TESTS, timeout_s=10.0,
                          isolation=isolation)
    assert score == 0.0 and result.error is None
    seen = _seen(result)
    assert "Too many open files" in seen["error"] and seen["held"] < 256  # code_reward's open_files
    assert len(os.listdir("/proc/self/fd")) == before  # the sandbox closed what it opened
    handles = [open(os.devnull) for _ in range(300)]
    for handle in handles:
        handle.close()
    assert code_reward(ADD, ADD_TESTS, isolation=isolation) == 1.0


CANARY = ("import signal, sys, time\nsignal.signal(signal.SIGURG, lambda *a: open(sys.argv[1], 'a').write('got\\n'))\n"
          "open(sys.argv[1] + '.ready', 'w').close()\nwhile True:\n    time.sleep(0.05)\n")

# the harmless probe's ways to reach the canary: signals (SIGURG, ignored by default) and changes it can be checked for
CANARY_PROBES = {
    "-1": "os.kill(-1, signal.SIGURG)",
    "canary": "os.kill(CANARY, signal.SIGURG)",
    "group": "os.killpg(CANARY, signal.SIGURG)",
    "parent": "os.kill(os.getppid(), signal.SIGURG)",
    "pidfd": "signal.pidfd_send_signal(os.pidfd_open(CANARY), signal.SIGURG)",
    # the same through fresh copies of the built-in modules, which a guard that only replaced functions would miss
    "pidfd of fresh modules": "fresh('_signal').pidfd_send_signal(fresh('posix').pidfd_open(CANARY), signal.SIGURG)",
    "prlimit": "resource.prlimit(CANARY, resource.RLIMIT_NOFILE, (64, 64))",
    "setpriority": "os.setpriority(os.PRIO_PROCESS, CANARY, 19)",
    "sched_setaffinity": "os.sched_setaffinity(CANARY, {0})",
}

PARENT_ATTACKS = {
    "kill(ppid, SIGKILL)": "os.kill(os.getppid(), signal.SIGKILL)",
    "kill(ppid, SIGSTOP)": "os.kill(os.getppid(), signal.SIGSTOP)",
    "pidfd_send_signal(ppid, SIGKILL)": "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)",
    "killpg(0, SIGKILL)": "os.killpg(0, signal.SIGKILL)",
    "kill(-1, SIGKILL)": "os.kill(-1, signal.SIGKILL)",
    # the supervisor out of descriptors: its sweep cannot list /proc (the program outlived it, scored None)
    "prlimit(ppid, NOFILE, (0, 0))": "resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (0, 0))",
    "setpriority(ppid, 19)": "os.setpriority(os.PRIO_PROCESS, os.getppid(), 19)",
    "sched_setaffinity(ppid)": "os.sched_setaffinity(os.getppid(), {0})",
}


def _canary_state(pid: int) -> tuple:
    """What the probe could change in the canary besides its signal log."""
    return resource.prlimit(pid, resource.RLIMIT_NOFILE), os.getpriority(os.PRIO_PROCESS, pid), \
        os.sched_getaffinity(pid)


@pytest.mark.parametrize("attack", list(PARENT_ATTACKS))
def test_signals_to_the_parent(layered_isolation, judge, tmp_path, attack):
    """First a harmless probe: SIGURG (ignored by default everywhere) to -1, to a canary process of the caller's,
    to its group, to the parent and through a pidfd, and a lower descriptor limit, nice value and CPU set for the
    canary; the canary records any signal it gets, and its limits are compared. Only if nothing arrived, the real
    attack: the caller and the supervisor survive (the result is reported) and the score is 0. ``[socket, hook
    only]`` is what a kernel without Landlock's signal scope (ABI < 6, before Linux 6.12) gets."""
    isolation = layered_isolation
    log = tmp_path / "canary.log"
    canary = subprocess.Popen([sys.executable, "-c", CANARY, str(log)], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not Path(f"{log}.ready").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        before = _canary_state(canary.pid)
        probe = (f"import _imp, importlib.machinery, os, resource, signal\nCANARY = {canary.pid}\ndelivered = []\n"
                 "fresh = lambda name: _imp.create_builtin(importlib.machinery.ModuleSpec(name, None))\n"
                 f"for name, send in [{', '.join(f'({n!r}, lambda: {c})' for n, c in CANARY_PROBES.items())}]:\n"
                 "    try:\n        send()\n        delivered.append(name)\n"
                 "    except Exception as error:\n        print(name, 'refused', repr(error))\n")
        score, result = judge(probe, "assert delivered", isolation=isolation)
        time.sleep(0.2)
        assert score == 0.0 and not log.exists() and canary.poll() is None  # nothing reached the canary
        assert _canary_state(canary.pid) == before, result.stdout
        started = time.monotonic()
        program = "import os, resource, signal\n" + PARENT_ATTACKS[attack] + "\nsent = True\n" + ADD
        score, result = judge(program, "assert sent\n" + ADD_TESTS, timeout_s=5.0, isolation=isolation)
        assert score == 0.0 and result.error is None, result  # the supervisor lived to report
        assert time.monotonic() - started < 5.0  # and was not stopped until its deadline
        if attack == "killpg(0, SIGKILL)":
            assert result.returncode == -signal.SIGKILL  # only the program's own group
        assert canary.poll() is None and not log.exists() and _canary_state(canary.pid) == before
        assert _alive(result.scratch_dir) == []
    finally:
        canary.kill()
        canary.wait()


def _running_sandbox() -> tuple[int, int]:
    """(the supervisor, the program) of the one sandbox this process is running: the supervisor is our child that
    exec'd sandbox.py, the program the process whose command line names the scratch dir's prog.py."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
            except OSError:
                continue
            if _parent(int(pid)) == os.getpid() and argv[-3:-2] == [os.path.abspath(sandbox.__file__).encode()]:
                program = _alive(f"{json.loads(argv[-2])['scratch']}/prog.py")
                if program:
                    return int(pid), program[0]
        time.sleep(0.02)
    raise AssertionError("no sandbox with a running program found")


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _judge_in_background(judge, program: str, timeout_s: float, isolation: str):
    """``judge(program, ADD_TESTS)`` in a thread: (the thread, the dict its score and result will be put in)."""
    out = {}
    worker = threading.Thread(target=lambda: out.update(zip(("score", "result"), judge(
        program + ADD, ADD_TESTS, timeout_s=timeout_s, isolation=isolation))))
    worker.start()
    return worker, out


def test_a_killed_supervisor_takes_its_program_along(isolation, judge):
    """The supervisor is SIGKILLed from outside while the program sleeps: the verifier scores 0.0 at once (the
    program had started: a sandbox broken under it must not spare it a 0, as None would), and the program does not
    live on (the fallback: the caller kills the supervisor's session; namespaces: the init dies with its parent,
    PR_SET_PDEATHSIG, and the pid namespace with it)."""
    started = time.monotonic()
    worker, out = _judge_in_background(judge, "import time\ntime.sleep(30)\n", 20.0, isolation)
    supervisor, _ = _running_sandbox()
    # The program shows in /proc as soon as it is exec'd; the supervisor says "running" to the caller just after,
    # when its status pipe closes. Killed in between (a busy machine: seen once in `make test`), the caller cannot
    # know the program ran and must answer None. The program sleeps 30 s: a second here is well past that moment.
    time.sleep(1.0)
    os.kill(supervisor, signal.SIGKILL)
    worker.join(timeout=30)
    assert out["score"] == 0.0 and out["result"].error is not None and out["result"].started
    assert time.monotonic() - started < 10  # not the program's 20 s deadline
    assert _alive(out["result"].scratch_dir) == []


def test_a_crippled_supervisor_still_kills_its_program(isolation, judge):
    """The process that runs the program (the supervisor, or the namespace's init) gets RLIMIT_NOFILE (0, 0) from
    outside while its program sleeps past the deadline, as a program could do to it through ``prlimit``: its
    sweep then cannot list /proc. It kills the program's group before counting, reports the failure, the caller
    kills what is left of its session, and the program, which had started, scores 0.0."""
    worker, out = _judge_in_background(judge, "import time\ntime.sleep(30)\n", 5.0, isolation)
    _, program = _running_sandbox()
    resource.prlimit(_parent(program), resource.RLIMIT_NOFILE, (0, 0))
    worker.join(timeout=30)
    result = out["result"]
    assert out["score"] == 0.0 and result.error is not None and result.started, result
    assert _alive(result.scratch_dir) == []


def test_oom_killer_takes_the_sandbox_first(isolation, judge):
    """The program starts with oom_score_adj 1000 (under memory pressure the kernel kills it, not the trainer) and
    cannot lower it."""
    program = ("import json\nseen = {'before': open('/proc/self/oom_score_adj').read().strip()}\n"
               "try:\n    open('/proc/self/oom_score_adj', 'w').write('-1000')\nexcept OSError as error:\n"
               "    seen['lower'] = repr(error)\nseen['after'] = open('/proc/self/oom_score_adj').read().strip()\n"
               "print('SEEN', json.dumps(seen))\n")
    score, result = judge(program, "assert seen['after'] != '1000'", isolation=isolation)
    assert score == 0.0
    seen = _seen(result)
    assert seen["before"] == seen["after"] == "1000" and "lower" in seen


def test_a_set_up_failure_is_an_error_not_a_verdict(isolation):
    """The forked child fails before exec (here: an RLIMIT_NOFILE above the kernel's maximum): the sandbox says it
    failed (``error``, which code_reward scores None) instead of reporting a program that exited 126."""
    result = run_sandboxed("print(1)", isolation=isolation, timeout_s=5, open_files=1 << 40)
    assert result.error is not None and "could not start the program" in result.error
    assert result.returncode is None and _alive(result.scratch_dir) == []


def _system_python() -> str | None:
    """A Python >= 3.11 outside any home directory (the distribution's), which the host's nobody can run."""
    for path in ("/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            version = subprocess.run([path, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                                     capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            continue
        if version == "True":
            return path
    return None


@pytest.mark.skipif(os.getuid() != 0, reason="the fallback hands the program to nobody only for a root caller")
def test_a_root_callers_fallback_program_runs_as_nobody(monkeypatch):
    """With an interpreter the host's nobody can reach (the distribution's Python), a root caller's fallback program
    runs as nobody, so the kernel, not only the audit hook, refuses its signals, rlimit and priority changes to
    root's processes and root's private files. With one it cannot reach (a pyenv in /root), it keeps uid 0 without
    capabilities, and the result's notes say so."""
    program = ("import os, json\nseen = {'ids': [os.getuid(), os.getgid(), os.getgroups()]}\n"
               "for name, attempt in [('shadow', lambda: open('/etc/shadow').read()),\n"
               "                      ('kill parent', lambda: os.kill(os.getppid(), 0))]:\n"
               "    try:\n        attempt()\n        seen[name] = 'done'\n"
               "    except OSError as error:\n        seen[name] = 'refused: ' + repr(error)\n"
               "print('SEEN ' + json.dumps(seen))\n")
    note = "the program runs as uid 0"
    result = run_sandboxed(program, isolation="socket", timeout_s=10)  # this interpreter
    assert result.ok, result
    seen = _seen(result)
    if any(note in n for n in result.notes):
        assert seen["ids"][:2] == [0, 0]
    else:
        assert seen["ids"] == [65534, 65534, []]
    system = _system_python()
    if system is None:
        pytest.skip("no Python >= 3.11 outside the home directories here")
    monkeypatch.setattr(sandbox.sys, "executable", system)
    result = run_sandboxed(program, isolation="socket", timeout_s=10)
    assert result.ok and not any(note in n for n in result.notes), result
    seen = _seen(result)
    assert seen["ids"] == [65534, 65534, []]
    assert seen["shadow"].startswith("refused: ") and seen["kill parent"].startswith("refused: ")
