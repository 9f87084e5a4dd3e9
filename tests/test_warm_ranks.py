"""tests/warm_ranks.py starts processes as the deepspeed launcher and ``python`` would: each rank gets the launcher's
environment and ``--local_rank``, the first failing process's exit code is the run's, stdout and stderr stay apart,
and nothing one run changes in a module reaches the next run."""

from __future__ import annotations

import pytest
import warm_ranks

pytestmark = pytest.mark.multiproc

RANK_SCRIPT = '''
import os, sys
import hybrid_ds.runtime.engine
print(f"rank {os.environ['RANK']}/{os.environ['LOCAL_RANK']} of {os.environ['WORLD_SIZE']}/{os.environ['LOCAL_SIZE']} "
      f"argv {sys.argv[1:]} init_distributed was replaced: {hybrid_ds.runtime.engine.init_distributed is None}")
print(f"stderr of rank {os.environ['RANK']}", file=sys.stderr)
hybrid_ds.runtime.engine.init_distributed = None  # what a worker's monkeypatch does; the next run must not see it
sys.exit(3 * int(os.environ["RANK"]))
'''


def test_ranks_get_the_launchers_environment_and_the_first_failure_is_the_runs(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    for _ in range(2):  # the second run sees the modules as imported, not as the first run left them
        done = warm_ranks.run(script, ["--flag", "x"], nproc=2)
        assert done.returncode == 3, done
        assert done.stdout.splitlines() == [
            "rank 0/0 of 2/2 argv ['--flag', 'x', '--local_rank=0'] init_distributed was replaced: False",
            "rank 1/1 of 2/2 argv ['--flag', 'x', '--local_rank=1'] init_distributed was replaced: False"], done
        assert done.stderr.splitlines() == ["stderr of rank 0", "stderr of rank 1"], done


def test_cli_is_one_plain_process_with_its_exit_code_and_its_own_stderr(tmp_path):
    done = warm_ranks.cli("validate", tmp_path / "missing.json")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"hybrid-ds: error: {tmp_path / 'missing.json'}: config file not found"], done
