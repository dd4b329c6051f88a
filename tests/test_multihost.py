"""Multi-host: the main job as two processes over loopback (gloo), 2 CPU devices each, parameters
FSDP-sharded across both; it must give the run one process on 4 devices gives."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, rl_log, xla_env

TINY_JOB = [f"--config={ROOT}/configs/arith.py", "--config.mesh=(1,-1,1)",
            "--config.task.options.num_train=200", "--config.task.options.num_test=8",
            "--config.task.options.validation_size=8",
            "--config.task.options.max_steps=3", "--config.sft.max_length=128", "--config.rl.max_prompt_length=96",
            "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
            "--config.model.num_layers=2", "--config.model.num_heads=2", "--config.model.num_kv_heads=2",
            "--config.model.head_dim=16", "--config.sft.steps=6", "--config.sft.batch_size=8",
            "--config.sft.eval_every=3", "--config.sft.eval_examples=8", "--config.sft.checkpoint_every=3",
            "--config.rl.steps=3", "--config.rl.batch_size=8", "--config.rl.max_new_tokens=24",
            "--config.rl.eval_every=3",  # evaluations write sample completions on process 0 alone
            "--config.rl.length_bucket=128",  # no trimming: one update shape for three processes to compile
            "--config.eval.num_examples=8", "--config.eval.batch_size=8", "--config.eval.max_new_tokens=24",
            # each process scores otherwise: the run must take process 0's scores (one process: the same)
            "--config.task.options.reward_fn=helpers:process_dependent_reward"]
WITH_HELPERS = {"PYTHONPATH": os.path.join(ROOT, "tests")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(workdirs, overrides=(), envs=({}, {}), own_overrides=((), ())) -> list[tuple[int, str, str]]:
    """Runs the tiny job as two processes over loopback, each with its own workdir, environment
    additions and overrides besides the shared ones; their (exit status, stdout, stderr)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "r3jax.main", *TINY_JOB, *overrides, *own, f"--workdir={workdir}",
                               f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}"],
                              cwd=ROOT, env={**xla_env(2), **WITH_HELPERS, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i, (workdir, env, own) in enumerate(zip(workdirs, envs, own_overrides))]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs)]


def _two_processes(workdir, *overrides) -> list[tuple[str, str]]:
    """Runs the tiny job as two processes in one workdir; their (stdout, stderr), once both exit 0."""
    outputs = _launch_two((workdir, workdir), overrides)
    for code, _, err in outputs:
        assert code == 0, err[-3000:]
    return [(out, err) for _, out, err in outputs]


COMPUTED_BY_PRIMARY = """
import sys, jax
from r3jax import sharding
sharding.initialize_distributed(False, sys.argv[1], 2, int(sys.argv[2]))
mine = jax.process_index()
assert sharding.computed_by_primary(lambda: [mine, "x" * 3000 * (mine + 1)]) == [0, "x" * 3000]
def fails_on_process_0():
    if mine == 0:
        raise ValueError("bad reward")
    return 1.0
try:
    sharding.computed_by_primary(fails_on_process_0)
except ValueError as error:
    print("raised", error)
"""


def test_what_process_0_computes_every_process_gets_and_so_its_errors():
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", COMPUTED_BY_PRIMARY, coordinator, str(i)], cwd=ROOT,
                              env=xla_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == "raised bad reward"  # after gloo's own lines


def test_processes_with_another_config_are_refused(tmp_path):
    """As if one host had been given another command line (or had another checkout or data)."""
    outputs = _launch_two([tmp_path / "run"] * 2, own_overrides=((), ("--config.rl.lr=2e-5",)))
    assert [code for code, _, _ in outputs] == [2, 2]
    for _, _, err in outputs:
        assert err.strip().splitlines()[-1] == (
            "error: processes [1] differ from process 0 in r3jax's source, library versions, config or the task's "
            "data (each says which); run one checkout, environment, config and data on every host")
    assert "process 1: not as on process 0: config\n" in outputs[1][2]
    assert not os.path.exists(tmp_path / "run" / "config.json")  # refused before it wrote anything


def test_processes_that_do_not_share_the_workdir_are_refused(tmp_path):
    """As if each host had its own disk: each process is given a folder of its own. The compilation
    cache's is a warning (a rerun still works, compiling on process 1), the workdir's an error."""
    caches = [{"JAX_COMPILATION_CACHE_DIR": str(tmp_path / f"cache{i}")} for i in range(2)]
    outputs = _launch_two([tmp_path / "host0", tmp_path / "host1"], envs=caches)
    assert [code for code, _, _ in outputs] == [2, 2]
    for i, (_, _, err) in enumerate(outputs):
        assert err.strip().splitlines()[-1] == (
            f"error: --workdir={tmp_path / f'host{i}'}: processes [1] do not see what process 0 writes there; a "
            "run over several hosts needs a workdir every host mounts (NFS, Filestore, gcsfuse)")
    assert f"warning: compile_cache {tmp_path / 'cache0'}: processes [1] do not see" in outputs[0][2]
    assert "warning: compile_cache" not in outputs[1][2]


def _two_processes_at_rl_step_2(workdir, stderr, overrides=(), env=None) -> list[subprocess.Popen]:
    """The tiny job as two processes with 60 RL steps (and `overrides`, and `env` added to their
    environment), once their second RL step is logged."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "r3jax.main", *TINY_JOB, "--config.rl.steps=60",
                               "--config.rl.eval_every=0", "--config.rl.checkpoint_every=1000", *overrides,
                               f"--workdir={workdir}", f"--coordinator={coordinator}", "--num_processes=2",
                               f"--process_id={i}"],
                              cwd=ROOT, env={**xla_env(2), **WITH_HELPERS, **(env or {})}, stdout=subprocess.DEVNULL,
                              stderr=stderr, text=True)
             for i in range(2)]
    deadline = time.time() + 300
    while len(rl_log(str(workdir))) < 2:
        if time.time() > deadline or any(proc.poll() is not None for proc in procs):
            for proc in procs:
                proc.kill()
            raise AssertionError(f"RL step 2 not reached: {[proc.poll() for proc in procs]}")
        time.sleep(0.2)
    return procs


def test_a_stop_signal_to_one_process_stops_and_saves_every_process(tmp_path):
    """A preemption notice can reach one host alone. Before, the process it reached saved while
    the other ran its next step: a collective mismatch, and both aborted (SIGABRT) 70 s later
    with nothing saved."""
    procs = _two_processes_at_rl_step_2(tmp_path, subprocess.PIPE)
    try:
        procs[1].send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert codes == [75, 75], [proc.stderr.read()[-2000:] for proc in procs]
    steps = len(rl_log(str(tmp_path)))
    assert steps < 60 and os.path.isdir(tmp_path / "rl" / "checkpoints" / str(steps))


def test_a_process_that_dies_ends_the_others_at_once_in_one_line(tmp_path):
    """Before: process 0's collective failed at once, but its exit waited in JAX's shutdown barrier
    for the dead process's heartbeat timeout, then aborted (SIGABRT, 82 s after the kill)."""
    with open(tmp_path / "stderr_0", "w") as stderr:
        procs = _two_processes_at_rl_step_2(tmp_path / "run", stderr)
        try:
            procs[1].kill()
            code = procs[0].wait(timeout=60)
        finally:
            procs[0].kill()
    last = (tmp_path / "stderr_0").read_text().splitlines()[-1]
    assert code == 76, last
    assert re.fullmatch(r"error: process 0 of 2: a collective failed, since another process of this run is gone "
                        r"\(.*Connection (closed|reset) by peer.*\); see that process's log, then rerun every process with "
                        r"the same command to resume from the last checkpoint", last)


@pytest.mark.slow  # 40 s; in CI the watchdog ends a one-process run (test_main.py) and test_watchdog.py checks its bound
def test_a_process_stuck_alive_ends_the_run_past_its_stall_timeout(tmp_path):
    """Process 0 stuck in a reward function that never returns, process 1 waiting for its scores
    in a collective: heartbeats go on, so JAX ends neither (jax#38503)."""
    hang = tmp_path / "hang"
    with open(tmp_path / "stderr", "w") as stderr:
        procs = _two_processes_at_rl_step_2(tmp_path / "run", stderr, (
            "--config.stall_timeout_s=20", "--config.task.options.reward_fn=helpers:hangs_once_told"),
            {"R3JAX_TEST_HANG": str(hang)})
        try:
            hang.touch()
            codes = [proc.wait(timeout=120) for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
    err = (tmp_path / "stderr").read_text()
    assert codes[0] == 124 and codes[1] in (124, 76), (codes, err[-3000:])  # 1: its own watchdog, or process 0 gone
    assert re.search(r"error: process 0 of 2: nothing finished for 20 s since RL mixed step \d+ \(stall_timeout_s\)", err)


def test_two_processes_match_one_and_resume(tmp_path):
    single = tmp_path / "single"
    one = subprocess.run([sys.executable, "-m", "r3jax.main", *TINY_JOB, f"--workdir={single}"],
                         cwd=ROOT, env={**xla_env(4), **WITH_HELPERS}, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    multi = tmp_path / "multi"
    (out_0, err_0), (out_1, err_1) = _two_processes(multi)
    assert "RL mixed" in err_0 and "RL mixed" not in err_1  # one progress bar
    for line in ("r3jax train:", "results written to"):  # one process speaks for the run
        assert line in out_0 and line not in out_1, line

    assert json.load(open(multi / "results.json")) == json.load(open(single / "results.json"))
    for want, have in zip(rl_log(str(single)), rl_log(str(multi)), strict=True):
        assert have["reward"] == want["reward"] and have["response_length"] == want["response_length"]
        assert have["loss"] == pytest.approx(want["loss"], rel=1e-3, abs=1e-5)
    exported = sorted(os.listdir(multi / "rl" / "final"))
    assert "model.safetensors" in exported and "tokenizer.model" in exported

    # one RL step more: each process restores its checkpoint onto the mesh and goes on
    (out_0, _), (out_1, _) = _two_processes(multi, "--config.rl.steps=4")
    assert "RL mixed: resuming at step 3 (3 of 4 steps)" in out_0 and "resuming" not in out_1
    assert [record["step"] for record in rl_log(str(multi))] == [1, 2, 3, 4]
