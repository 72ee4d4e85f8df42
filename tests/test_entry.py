"""The `gspo` entry point: a process of a multi-process launch exits with main()'s status after Python's exit
handlers ran (and skips only the native teardown, see gspo.cli.entry); one process exits as usual."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)
SCRIPT = ("import atexit, sys\n"
          "atexit.register(lambda: print('exit handlers ran', flush=True))\n"
          "sys.argv = ['gspo', *sys.argv[1:]]\n"
          "from gspo.cli import entry\n"
          "entry()\n")


@pytest.mark.parametrize("world", ["1", "2"])
@pytest.mark.parametrize(("args", "code"), [(["stages"], 0), (["train", "no/such/config.yaml"], None)])
def test_status_and_exit_handlers_kept(tmp_path, world, args, code):
    env = dict(os.environ, WORLD_SIZE=world, RANK="1", LOCAL_RANK="1")
    p = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       check=False)
    assert "exit handlers ran" in p.stdout, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    if code is None:  # a user mistake: its status, not 0, and one error line
        assert p.returncode not in (0, -6) and "error" in p.stderr.lower(), (p.returncode, p.stderr[-2000:])
    else:
        assert p.returncode == code, (p.returncode, p.stderr[-2000:])
