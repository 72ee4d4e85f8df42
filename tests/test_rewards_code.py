"""The code-execution reward and its sandbox: correct/wrong programs, then hostile ones. The trainer (this
pytest process) must survive each hostile program and score it 0. Small limits keep the suite fast."""

import json
import os
import shutil
import socket
import tempfile
import textwrap

import pytest
from gspo_rewards import code as code_reward
from gspo_rewards.sandbox import UID_BASE, Limits, SandboxUnavailable, default_hide, run_program

from gspo.rewards import RewardLoadError, RewardSet


def _isolation_works() -> bool:
    try:
        return code_reward.check_isolation()
    except SandboxUnavailable:
        return False


# CI runs as root, where isolation works and every test below runs. Elsewhere the reward must refuse to run:
# test_refuses_to_run_without_isolation checks that on such machines. With CI set nothing is skipped: a CI
# machine that cannot isolate fails these tests (and test_isolation_works_on_ci says why) instead of passing
# them silently as skips.
ON_CI = bool(os.environ.get("CI"))
ISOLATED = _isolation_works()
needs_root = pytest.mark.skipif(not ISOLATED and not ON_CI,
                                reason="the sandbox cannot isolate here (needs root + namespaces)")
LIMITS = {"cpu_s": 1, "wall_s": 3.0, "memory_mb": 256}
DOUBLE = [{"input": "3\n", "output": "6"}, {"input": "10\n", "output": "20"}]


def block(src: str) -> str:
    return "Here is my solution:\n```python\n" + textwrap.dedent(src).strip() + "\n```"


def score(src: str, cases=DOUBLE, **kwargs) -> float | None:
    return code_reward.code_execution(["task"], [block(src)], test_cases=[cases], **LIMITS, **kwargs)[0]


def sandbox_processes() -> list[int]:
    """Pids of processes still running under a sandbox uid (there must be none after a run)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid >= UID_BASE:
                    found.append(int(entry))
            except FileNotFoundError:
                pass
    return found


# ------------------------------------------------------------------------------------------ plain scoring


@needs_root
@pytest.mark.parametrize("src,expected", [
    ("print(int(input()) * 2)", 1.0),
    ("print(int(input()) + 2)", 0.0),  # right on neither case
    ("print(int(input()) + 3)", 0.0),  # right on the first case only: all must pass
    ("raise SystemExit(1)", 0.0),
    ("print(int(input()) * 2   )\nprint()  ", 1.0),  # trailing whitespace / blank lines ignored
])
def test_stdin_stdout_cases(src, expected):
    assert score(src) == expected


@needs_root
def test_partial_credit_asserts_json_cases_no_code_and_no_cases():
    assert score("print(int(input()) + 3)", partial_credit=True) == 0.5
    asserts = ["assert double(2) == 4", {"assert": "assert double(-1) == -2"}]
    assert score("def double(x):\n    return 2 * x", cases=asserts) == 1.0
    assert score("def double(x):\n    return x + 2", cases=asserts) == 0.0
    assert score("print(int(input()) * 2)", cases=json.dumps(DOUBLE)) == 1.0
    out = code_reward.code_execution(["t"] * 2, ["no code at all", block("print(1)")], test_cases=[DOUBLE, []],
                                     **LIMITS)
    assert out == [0.0, None]


@needs_root
def test_many_samples_run_in_parallel_and_keep_their_order():
    srcs = ["print(int(input()) * 2)", "print(0)"] * 4
    out = code_reward.code_execution(["t"] * 8, [block(s) for s in srcs], test_cases=[DOUBLE] * 8, max_workers=4,
                                     **LIMITS)
    assert out == [1.0, 0.0] * 4


@needs_root
def test_reward_set_runs_code_execution_with_the_startup_check():
    rs = RewardSet.from_specs([{"fn": "code_execution", "kwargs": LIMITS}], columns=["test_cases"])
    out = rs(["t"] * 2, [block("print(int(input()) * 2)"), block("print(5)")], [[1], [2]],
             {"test_cases": [DOUBLE, DOUBLE]})
    assert out.rewards.tolist() == [1.0, 0.0]
    with pytest.raises(RewardLoadError, match="test_cases"):
        RewardSet.from_specs([{"fn": "code_execution"}], columns=["tests"])


# ------------------------------------------------------------------------------------------------ hostile


def test_isolation_works_on_ci():
    """CI must run the isolation tests, not skip them (CI runs as root with namespaces available)."""
    if not ON_CI:
        pytest.skip("only meaningful with CI set")
    assert ISOLATED, f"the code sandbox cannot isolate on this CI machine: {code_reward._probe.get('reason')}"


def run(src: str) -> "object":
    return run_program(textwrap.dedent(src), limits=Limits(**LIMITS))


@needs_root
def test_fork_bomb():
    # The process limit stops it: forking fails well before 200 children (a sandbox without it would fork on).
    result = run("""
        import os, time
        n = 0
        try:
            for _ in range(200):
                if os.fork() == 0:
                    time.sleep(2)
                    os._exit(0)
                n += 1
            print("forked", n)
        except OSError:
            print("refused after", n)
    """)
    assert result.status == "ok" and result.stdout.startswith("refused after"), result.stdout
    assert int(result.stdout.split()[-1]) < Limits(**LIMITS).nproc
    assert score("import os\nwhile True:\n    os.fork()\nprint(6)") == 0.0
    assert sandbox_processes() == []  # every child is gone when the run ends
    assert score("print(int(input()) * 2)") == 1.0  # the sandbox still works afterwards


@needs_root
def test_memory_hog():
    # The address-space limit (256 MB here) refuses the allocations: growing in 10 MB steps stops below it,
    # a 10 GB block fails outright. A sandbox without the limit would reach 1 GB / allocate the block.
    result = run("""
        x = []
        try:
            while len(x) < 100:
                x.append(bytearray(10**7))
            print("allocated", 10 * len(x))
        except MemoryError:
            print("refused at", 10 * len(x))
        try:
            y = bytearray(10**10)
            print("huge block allocated")
        except MemoryError:
            print("huge block refused")
    """)
    lines = result.stdout.splitlines()
    assert result.status == "ok" and lines[0].startswith("refused at") and lines[1] == "huge block refused", lines
    assert int(lines[0].split()[-1]) < LIMITS["memory_mb"]
    assert score("x = []\nwhile True:\n    x.append(bytearray(10**7))\nprint(6)") == 0.0


@needs_root
def test_infinite_loops_cpu_and_wall():
    import signal
    import time

    start = time.monotonic()
    busy = run("while True:\n    pass")  # the CPU limit kills it (SIGXCPU, then SIGKILL at the hard limit)
    assert busy.status == "ok" and busy.returncode in (-signal.SIGXCPU, -signal.SIGKILL), busy
    idle = run("import time\ntime.sleep(1000)")  # no CPU used: the wall deadline ends it
    assert idle.status == "timeout"
    assert time.monotonic() - start < 2 * (LIMITS["cpu_s"] + 1 + LIMITS["wall_s"]) + 5
    assert score("while True:\n    pass") == 0.0
    assert sandbox_processes() == []


@needs_root
def test_writing_outside_the_work_dir(tmp_path, monkeypatch):
    trainer_cwd = tmp_path / "trainer"
    trainer_cwd.mkdir()
    monkeypatch.chdir(trainer_cwd)  # the trainer's working directory is hidden and not writable
    targets = [trainer_cwd / "escaped.txt", tmp_path / "escaped.txt"]
    src = "\n".join(f"try:\n    open({str(t)!r}, 'w').write('pwned')\n    print('wrote')\n"
                    f"except OSError:\n    print('refused')" for t in targets)
    result = run_program(src, limits=Limits(**LIMITS))
    assert result.status == "ok" and result.stdout.split() == ["refused", "refused"], result.stdout
    assert not any(t.exists() for t in targets)
    (trainer_cwd / "trainer_data.txt").write_text("private")
    listing = f"import os\ntry:\n    print(os.listdir({str(trainer_cwd)!r}))\nexcept OSError as e:\n    print(e)"
    result = run_program(listing, limits=Limits(**LIMITS))
    assert result.status == "ok" and result.stdout and "trainer_data" not in result.stdout


@needs_root
def test_reading_the_parent_environment(monkeypatch):
    secret = "s3cr3t-token-for-the-sandbox-test"
    monkeypatch.setenv("GSPO_TEST_SECRET", secret)
    src = f"""
        import os, glob
        print(os.environ.get("GSPO_TEST_SECRET", ""))
        for path in ["/proc/self/environ", "/proc/1/environ", "/proc/{os.getpid()}/environ", *glob.glob("/proc/*/environ")]:
            try:
                print(open(path, "rb").read().decode(errors="replace"))
            except OSError:
                pass
        print("searched")
    """
    result = run_program(textwrap.dedent(src), limits=Limits(**LIMITS))
    # it ran to the end (an early crash would also leave the secret out of stdout) and found nothing
    assert result.status == "ok" and result.stdout.rstrip().endswith("searched") and secret not in result.stdout
    assert score(src, cases=[{"input": "", "output": secret}]) == 0.0


@needs_root
def test_opening_a_socket():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        src = (f"import socket\ntry:\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
               "    s.sendall(b'hi')\n    print('connected')\nexcept OSError as e:\n    print('refused')")
        result = run_program(src, limits=Limits(**LIMITS))
        assert result.status == "ok" and result.stdout.strip() == "refused", result.stdout
        with pytest.raises(socket.timeout):
            listener.accept()  # no connection ever arrived
    finally:
        listener.close()


@needs_root
def test_killing_its_parent_and_the_trainer():
    me = os.getpid()
    src = f"""
        import os
        for pid in (os.getppid(), {me}):
            try:
                os.kill(pid, 9)
                print("sent", pid)
            except Exception as e:
                print(type(e).__name__, pid)
        os.killpg(os.getpgrp(), 9)
    """
    result = run_program(textwrap.dedent(src), limits=Limits(**LIMITS))
    assert result.status == "ok"  # the launcher reported back: it survived
    # the program did try the trainer's pid, and could not reach it (another pid namespace)
    assert f"ProcessLookupError {me}" in result.stdout.splitlines() or f"PermissionError {me}" in \
        result.stdout.splitlines(), result.stdout
    assert score(src, cases=[{"input": "", "output": "sent"}]) == 0.0
    assert os.getpid() == me and sandbox_processes() == []


# ------------------------------------------------------------------------------------------- fail closed


def test_refuses_to_run_without_isolation(monkeypatch):
    if ISOLATED:  # simulate an unprivileged machine: the probe's verdict is what the reward acts on
        monkeypatch.setitem(code_reward._probe, "reason", "not root: cannot create namespaces")
    with pytest.raises(SandboxUnavailable, match="allow_unisolated"):
        score("print(int(input()) * 2)")
    with pytest.raises(RewardLoadError, match="refuses to run"):
        RewardSet.from_specs([{"fn": "code_execution"}], columns=["test_cases"])
    # The explicit opt-out runs (rlimits, empty environment, temporary directory only).
    assert score("print(int(input()) * 2)", allow_unisolated=True) == 1.0
    assert score("print(int(input()) + 1)", allow_unisolated=True) == 0.0


@needs_root
def test_nested_hidden_paths_are_covered_once():
    # Outside /tmp (a fresh tmpfs in the sandbox anyway), wherever the tests run from.
    outer = tempfile.mkdtemp(prefix="gspo-hide-", dir="/var/lib" if os.path.isdir("/var/lib") else None)
    inner = os.path.join(outer, "inner")
    os.mkdir(inner)
    open(os.path.join(inner, "secret.txt"), "w").close()
    try:
        src = f"import os\nprint(6 * 7)\nprint(os.listdir({outer!r}))"
        result = run_program(src, limits=Limits(**LIMITS), hide=[inner, outer, *default_hide()])
        assert result.status == "ok" and result.stdout.splitlines() == ["42", "[]"]
    finally:
        shutil.rmtree(outer)




@needs_root
def test_a_program_cannot_fake_an_isolation_failure():
    """Printing the launcher's failure marker and exiting 97 is just a failing program: it scores 0 like any
    other, and the batch goes on (a real setup failure is reported through a close-on-exec pipe)."""
    src = "import sys\nsys.stderr.write('isolation_failed: fake\\n')\nsys.exit(97)"
    result = run_program(src, limits=Limits(**LIMITS))
    assert result.status == "ok" and result.returncode == 97


# ------------------------------------------------------------------------------- the sandbox cases

USERNS = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
ret = libc.unshare(0x10000000)  # CLONE_NEWUSER
print("created" if ret == 0 else os.strerror(ctypes.get_errno()))
"""


@needs_root
def test_sandboxed_code_cannot_create_a_user_namespace():
    result = run_program(textwrap.dedent(USERNS), limits=Limits(cpu_s=2, wall_s=10))
    assert result.status == "ok", result
    assert result.stdout.strip() == "Operation not permitted", result.stdout + result.stderr


LEAVES_A_CHILD = """
import os, time
if os.fork() == 0:
    os.setsid()  # leaves the program's session and process group
    open("/tmp/gspo_leftover_{tag}", "w").write(str(os.getpid()))
    time.sleep(120)
print(1)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_unisolated_mode_warns_and_leaves_no_process_behind(monkeypatch, caplog):
    import time

    tag = f"{os.getpid()}_{time.monotonic_ns()}"
    marker = f"/tmp/gspo_leftover_{tag}"
    monkeypatch.setitem(code_reward._probe, "reason", "not root: cannot create namespaces")
    monkeypatch.delitem(code_reward._probe, "warned", raising=False)
    with caplog.at_level("WARNING", logger="gspo"):
        code_reward.check_isolation(allow_unisolated=True)
    assert any("WITHOUT isolation" in r.getMessage() for r in caplog.records)
    result = run_program(LEAVES_A_CHILD.format(tag=tag), limits=Limits(cpu_s=2, wall_s=10), isolate=False)
    assert result.status == "ok" and result.stdout.strip() == "1", result
    deadline = time.monotonic() + 5
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(open(marker).read())  # noqa: SIM115
    os.remove(marker)
    try:
        assert not _alive(pid), f"the program's setsid child {pid} still runs"
    finally:
        if _alive(pid):
            os.kill(pid, 9)


@needs_root
def test_wall_deadline_holds_under_a_fork_bomb():
    """A fork bomb (up to the process limit) with a CPU limit above the wall limit: stopped at the wall
    deadline plus the kernel's teardown, not a multiple of it (the issue measured 11.8 s for 5 s)."""
    import time

    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = run_program(bomb, limits=Limits(cpu_s=30, wall_s=3.0))
    elapsed = time.monotonic() - start
    assert result.status == "timeout" and elapsed < 3.0 * 1.5, elapsed
    assert sandbox_processes() == []
