"""The code sandbox (posttrain.rewards.sandbox) and code_reward: correct, wrong and partially correct programs, and
the attacks of docs/verifiers.md (infinite loop, fork bomb, memory bomb, network, writes outside the scratch
directory, the parent's secrets, an output flood, a child that outlives its parent), each in both isolation modes:
the namespace sandbox (skipped where unavailable) and the socket-blocking fallback, forced so it is tested here too."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from posttrain.rewards.sandbox import namespaces_available, run_sandboxed
from posttrain.verifiers import code_reward, code_rewards

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\nassert add(0, 0) == 0\n"


@pytest.fixture(params=["namespace", "socket"])
def isolation(request):
    if request.param == "namespace" and not namespaces_available():
        pytest.skip("user/network/pid/mount namespaces are not available here (unshare failed)")
    return request.param


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
    assert result.filesystem == {"namespace": "read-only", "socket": "python-guard"}[isolation]
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
    "import ast, gc\nfor o in gc.get_objects():\n    if type(o) is list and o and all(isinstance(x, ast.stmt) for x in o):\n"
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
    assert code_reward(program, "assert True", isolation=isolation) == (1.0 if isolation == "namespace" else 0.0)
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
