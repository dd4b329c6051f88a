"""The CLI end to end: bad input, the GSM8K recipe on a tiny HF Llama, exact resume after kills."""
import dataclasses
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import ENV, ROOT, TINY, make_hf_model, rl_log, tiny_params
from r3jax import config as config_lib, curriculum, tasks, tokenizer
from r3jax.metrics import read_jsonl



def run_cli(*args, timeout=600, env=ENV, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "r3jax.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def start_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "r3jax.main", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_hf_model("llama", str(path))
    return str(path)


@pytest.mark.parametrize("args, named", [  # what the command line alone can get wrong; values: test_config.py
    (["--config=configs/arith.py", "--config.rl.klcoef=0.1"], "klcoef"),
    (["--config=configs/arith.py", "--config.rl.kl_coef=abc"], "--config.rl.kl_coef"),
    (["--config=configs/arith.py", "--config.sft.steps=1.5"], "--config.sft.steps"),
    (["--config=configs/nope.py"], "nope.py"),
    (["--config=configs/paper.py:gsm9k"], "configs/paper.py:gsm9k"),
])
def test_bad_input_exits_2_naming_it(args, named):
    result = run_cli(*args, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and named in last, last
    assert "Traceback" not in result.stderr


def test_a_misspelt_key_in_a_config_file_exits_2_naming_its_line(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text("from configs.arith import get_config as arith\n\n\ndef get_config():\n    c = arith()\n"
                    "    c.rl.lenght_bucket = 4\n    return c\n")
    test_bad_input_exits_2_naming_it([f"--config={path}"], f"config.rl.lenght_bucket: unknown config key, set in {path}:6")


@pytest.mark.slow  # 150 s; in CI the recipes' settings are checked by the paper-recipe test, the sharded
# update by tests/test_ppo.py and tests/test_trim.py on 8 devices, bfloat16 by tests/test_precision.py
def test_gsm8k_recipe_on_tiny_hf_llama(tmp_path, data_dir):
    task = tasks.get("gsm8k", limit=64)
    texts = [task.prompt(d.question) + d.response for d in task.demonstrations("train")]
    tok_file = tokenizer.train_sentencepiece(texts, str(tmp_path / "tok"), vocab_size=300)
    model_dir = tmp_path / "model"
    make_hf_model("llama", str(model_dir), vocab_size=tokenizer.load(tok_file).vocab_size,
                  max_position_embeddings=1024)
    workdir = tmp_path / "run"
    result = run_cli(
        "--config=configs/gsm8k.py", f"--config.model.path={model_dir}", f"--config.tokenizer.path={tok_file}",
        # passes over the data: 0.5 x 32 demonstrations / 8 = 2 SFT steps; 0.1 x ~160 start states / 8 = 2 RL steps
        f"--workdir={workdir}", "--config.task.options.limit=32", "--config.sft.data_epochs=0.5",
        "--config.sft.batch_size=8", "--config.rl.data_epochs=0.1", "--config.rl.batch_size=8",
        "--config.eval.batch_size=8", "--config.eval.num_examples=8", "--config.sft.eval_examples=8",
        "--config.rl.max_new_tokens=24", "--config.eval.max_new_tokens=24", "--config.rl.max_prompt_length=512",
        "--config.eval.maj_k=3", env=dict(os.environ))  # the recipe's FSDP mesh over 8 simulated devices
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(str(workdir / "sft" / "sft.jsonl"))] == [1, 2]
    rl_log = [json.loads(line) for line in open(workdir / "rl" / "rl.jsonl")]
    assert [r["step"] for r in rl_log] == [1, 2]
    for key in ("reward", "accuracy", "answered", "kl", "clip_frac", "value_explained_variance", "entropy",
                "response_length", "sample_tokens_per_s", "time/update_s"):
        assert all(np.isfinite(r[key]) for r in rl_log), key
    results = json.load(open(workdir / "results.json"))
    assert set(results) == {"sft", "sft maj@3", "r3-mixed", "r3-mixed maj@3"}
    assert 0.0 <= results["r3-mixed"]["accuracy"] <= 1.0 and 0.0 <= results["sft maj@3"]["sample_accuracy"] <= 1.0
    voted = [json.loads(line) for line in open(workdir / "r3-mixed_maj3_predictions.jsonl")]
    assert len(voted) == 8 and all(len(r["completions"]) == len(r["predictions"]) == 3 for r in voted)
    saved = json.load(open(workdir / "config.json"))
    assert saved["rl"]["kl_coef"] == 0.05 and saved["task"]["options"]["limit"] == 32
    assert (workdir / "rl" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("task_name", ["gsm8k", "gsm8k_pot", "svamp", "svamp_pot", "snli", "mnli", "race",
                                       "boardgameqa"])
def test_paper_recipe_validates_and_builds_its_start_states(task_name, hf_dir, data_dir):
    config = runpy.run_path(os.path.join(ROOT, "configs", "paper.py"))["get_config"](task_name)
    config.model.path = hf_dir
    config_lib.validate(config, num_devices=8)
    task = tasks.get(config.task.name, **config.task.options.to_dict())
    demos = task.demonstrations("train")[:12]
    states = [s for d in demos for s in curriculum.start_states(task, d, config.rl.num_start_states)]
    assert [s.stage for s in states] == [0, 1, 2, 3, 4] * len(demos)
    assert all(s.prompt_text + s.target == task.prompt(d.question) + d.response
               for s, d in zip(states, np.repeat(demos, 5)))
    assert [score.reward for score in task.score_batch([d.response for d in demos[:3]],
                                                       [d.answer for d in demos[:3]])] == [1.0] * 3
    task.close()
    # 60 start states, batch 64: 50 epochs (math) = 3,000 states = 46.9 -> 47 steps; 5 epochs -> 5 steps
    rl_steps = config_lib.training_steps(config.rl, len(states), config.rl.batch_size)
    assert rl_steps == (5 if task_name in ("snli", "mnli", "race", "boardgameqa") else 47)


TINY_RUN = [f"--config={ROOT}/configs/arith.py", "--config.task.options.num_train=200",
            "--config.task.options.validation_size=16",
            "--config.task.options.num_test=16", "--config.task.options.max_steps=3",
            "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
            "--config.model.num_layers=2", "--config.model.head_dim=8", "--config.sft.steps=4",
            "--config.sft.eval_every=0", "--config.rl.steps=10", "--config.rl.batch_size=8",
            "--config.rl.max_new_tokens=24", "--config.rl.eval_every=0", "--config.rl.checkpoint_every=2",
            "--config.eval.batch_size=16", "--config.eval.max_new_tokens=24", "--config.eval.num_examples=16"]
TIMING = ("time/", "sample_tokens_per_s", "compiled/")  # facts of the process, not of the trajectory


def _wait_for_step(proc, workdir, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(rl_log(workdir)) >= step:
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"RL step {step} not reached")


def test_a_run_whose_steps_stop_finishing_ends_past_its_stall_timeout(tmp_path):
    """A reward function that stops answering held the run forever; with stall_timeout_s it ends
    in one line (status 124), its last checkpoint kept for the rerun. The timeout leaves the other
    steps room on a host that runs other tests beside this one (one update shape: no compile after
    the first step)."""
    hang = tmp_path / "hang"
    proc = subprocess.Popen([sys.executable, "-m", "r3jax.main", *TINY_RUN, f"--workdir={tmp_path / 'run'}",
                             "--config.stall_timeout_s=10", "--config.rl.steps=40", "--config.rl.length_bucket=128",
                             "--config.task.options.reward_fn=helpers:hangs_once_told"], cwd=ROOT,
                            env={**ENV, "PYTHONPATH": os.path.join(ROOT, "tests"), "R3JAX_TEST_HANG": str(hang)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_step(proc, str(tmp_path / "run"), 2)
        hang.touch()
        told = time.monotonic()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    last_step = len(rl_log(str(tmp_path / "run")))
    assert proc.returncode == 124, err[-3000:]
    assert 9 < time.monotonic() - told < 40  # 10 s after the last step finished, which may precede `told`
    assert re.fullmatch(r"error: nothing finished for 10 s since RL mixed step \d+ \(stall_timeout_s\): a reward function "
                        r"or a service that hangs, or a stuck process of the run; ended so that a rerun of the same "
                        r"command resumes from the last checkpoint \(exit status 124\)", err.strip().splitlines()[-1])
    assert f"since RL mixed step {last_step} " in err
    assert os.path.isdir(tmp_path / "run" / "rl" / "checkpoints" / str(last_step - last_step % 2))


def test_killed_run_resumes_exactly(tmp_path):
    """The main job at toy scale, whole, then SIGTERM and SIGKILL through the CLI (GRPO with
    dynamic sampling resumes in-process: test_loop.py); then a damaged checkpoint, named in the
    last line with the step to resume from."""
    reference = tmp_path / "uninterrupted"
    result = run_cli(*TINY_RUN, "--workdir=uninterrupted", cwd=tmp_path)  # a relative workdir, as users type
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_main_job_outputs(reference)

    resumed = str(tmp_path / "resumed")
    proc = start_cli(*TINY_RUN, f"--workdir={resumed}")
    _wait_for_step(proc, resumed, 3)
    proc.send_signal(signal.SIGTERM)  # preemption: saves and exits with the documented requeue status
    assert proc.wait(timeout=120) == 75  # EX_TEMPFAIL: saved, rerun to resume
    stopped_at = len(rl_log(resumed))
    assert stopped_at < 10
    assert os.path.isdir(os.path.join(resumed, "rl", "checkpoints", str(stopped_at)))

    proc = start_cli(*TINY_RUN, f"--workdir={resumed}")
    _wait_for_step(proc, resumed, stopped_at + 3)
    proc.kill()  # SIGKILL: no chance to save; resumes from the last finished checkpoint
    proc.wait()

    result = run_cli(*TINY_RUN, f"--workdir={resumed}")
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = rl_log(reference), rl_log(resumed)
    assert [r["step"] for r in got] == list(range(1, 11))
    for want, have in zip(expected, got):
        for key, value in want.items():
            if not key.startswith(TIMING):
                assert have[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (want["step"], key)
    assert json.load(open(reference / "results.json")) == json.load(open(os.path.join(resumed, "results.json")))

    # a checkpoint damaged on disk (before: a traceback of hundreds of lines and status 1)
    damaged = reference / "rl" / "checkpoints" / "10"
    for data in (damaged / "state").glob("**/d/*"):  # tensorstore's data files, the manifest's nodes among them
        os.truncate(data, 10)
    result = run_cli(*TINY_RUN, "--workdir=uninterrupted", "--config.rl.steps=12", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.fullmatch(f"error: checkpoint {damaged} cannot be read \\(OUT_OF_RANGE: .*\\), perhaps damaged or cut "
                        f"short by a crash: delete {damaged} to resume from step 8", result.stderr.splitlines()[-1])


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_74_and_a_rerun_finishes(tmp_path):
    """A file-size limit stands in for a full disk: orbax's background save fails, and the run
    must stop with one closing line naming the checkpoints folder (before: a crash of ~1,800
    lines of tracebacks, after training on past the failed save), printed last and whole (before:
    tensorstore's threads printed into the middle of it). Without the limit, the same command
    then finishes."""
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that a write past the limit fails, not kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "r3jax.main", *TINY_RUN, "--mode=sft", f"--workdir={workdir}",
            f"--config.compile_cache={tmp_path / 'cache'}"]  # its own, so that its programs are new
    env = {k: v for k, v in ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    cut = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, preexec_fn=small_files)
    assert cut.returncode == 74, cut.stderr[-3000:]
    closing = cut.stderr.splitlines()[-1]  # last: the echoes of orbax's failed writes are not printed after it
    assert closing.startswith(f"error: {workdir}/sft/checkpoints: a checkpoint could not be written (")
    assert "File too large" in closing and "none is whole yet" in closing
    # a cache that cannot grow is no failure
    assert re.search(r"^warning: .*\.program: not kept \(\[Errno 27\] File too large: '", cut.stderr, re.M)
    assert "Event loop is closed" not in cut.stderr and "exception was never retrieved" not in cut.stderr
    assert "Traceback" not in cut.stderr  # orbax's records of the failed writes keep one line each
    rerun = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (workdir / "sft" / "best" / "model.safetensors").exists()


def _assert_main_job_outputs(workdir, max_update_shapes: int = 4):
    log = rl_log(str(workdir))
    assert all(f"{name}/stage_{k}" in log[0] for name in ("reward", "kl", "response_length", "accuracy")
               for k in range(5))  # rl.num_start_states = 5
    assert 1 <= log[-1]["compiled/update_shapes"] <= max_update_shapes  # trimmed batches, few compilations
    results = json.load(open(workdir / "results.json"))
    assert set(results) == {"sft", "r3-mixed"}
    for row in results.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and "accuracy/steps_2" in row
    table = (workdir / "results.md").read_text()
    assert "| sft |" in table and "95% interval" in table and "r3-mixed - sft: " in table
    for name in ("results.md", "sft/sft_curves.png", "rl/rl_curves.png", "sft/best/model.safetensors",
                 "rl/final/model.safetensors"):
        assert (workdir / name).exists(), name


def test_the_compile_cache_keeps_compiles_shorter_than_jaxs_one_second_default(tmp_path):
    """JAX caches only compiles of 1 s or more unless told otherwise; a one-add program takes
    milliseconds, and must still land in the cache. The kept programs keep to half the bound,
    and JAX's own bound stays off."""
    env = {k: v for k, v in ENV.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE",
                                                      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    code = ("import sys, jax; from r3jax import programs; from r3jax.main import use_compile_cache; "
            "use_compile_cache(sys.argv[1], 0.5); jax.jit(lambda x: x + 1)(1.0).block_until_ready(); "
            "print(programs.max_bytes, jax.config.jax_compilation_cache_max_size)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], env=env, check=True, timeout=120,
                          capture_output=True, text=True)
    assert os.listdir(tmp_path / "cache")
    assert done.stdout.split()[-2:] == [str(250_000_000), "-1"]


def _cache_entries(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith("-cache"))


def test_jaxs_entries_keep_within_half_the_bound_at_start_up_least_recently_used_first(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    for age, name in enumerate(["newest-cache", "oldest-cache"]):
        (cache / name).write_bytes(b"x" * 400)
        os.utime(cache / name, (1e9 - age, 1e9 - age))
    env = {k: v for k, v in ENV.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE")}
    code = "import sys; from r3jax.main import use_compile_cache; use_compile_cache(sys.argv[1], 1e-6)"  # 500 bytes
    subprocess.run([sys.executable, "-c", code, str(cache)], env=env, check=True, timeout=120)
    assert _cache_entries(cache) == ["newest-cache"]


def test_a_compile_cache_that_cannot_be_written_is_left_off_with_one_warning(tmp_path):
    """Before, every kept program printed that it was not kept, and JAX warned on its own."""
    (tmp_path / "a_file").write_text("")
    env = {k: v for k, v in ENV.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE")}
    code = ("import sys, jax; from r3jax.main import use_compile_cache; use_compile_cache(sys.argv[1], 10); "
            "print(jax.config.jax_compilation_cache_dir)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a_file" / "cache")], env=env, check=True,
                          timeout=120, capture_output=True, text=True)
    assert done.stdout.split()[-1] == "None"
    assert done.stderr.strip() == (f"warning: compile_cache {tmp_path}/a_file/cache: cannot write there (Not a "
                                   "directory); compiling every program afresh")


def test_an_entry_cut_short_is_removed_and_cached_again_with_one_line(tmp_path):
    """JAX writes an entry in place and never overwrites one, so an entry cut short by a full disk
    (a file-size limit here) or a crash made every later run warn and compile it again."""
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # each of this program's entries is larger

    env = {k: v for k, v in ENV.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE")}
    code = ("import sys, jax; from r3jax.main import use_compile_cache; use_compile_cache(sys.argv[1], 0.5); "
            "print(jax.jit(lambda x: x * 3 + 1)(2.0))")
    cache = tmp_path / "cache"

    def rerun(limit=None, python_options=()) -> list[str]:
        done = subprocess.run([sys.executable, *python_options, "-c", code, str(cache)], env=env, check=True,
                              timeout=120, capture_output=True, text=True, preexec_fn=limit)
        assert done.stdout.split()[-1] == "7.0"
        return done.stderr.splitlines()

    failed_writes = rerun(limit=small_files)
    assert failed_writes and all(re.fullmatch(f"warning: compile_cache {re.escape(str(cache))}: '.+' could not be cached "
                                              r"\(OSError: \[Errno 27\] File too large\); the next run compiles it "
                                              "again", line) for line in failed_writes), failed_writes
    assert _cache_entries(cache) == []  # none cut short left behind
    assert rerun() == []
    entries = _cache_entries(cache)
    sizes = {name: os.path.getsize(cache / name) for name in entries}
    with open(cache / entries[0], "r+b") as entry:
        entry.truncate(sizes[entries[0]] // 2)
    module = entries[0].rsplit("-", 2)[0]
    mended = [f"warning: compile_cache {cache}: an entry of '{module}' could not be read (error: Error -5 while "
              "decompressing data: incomplete or truncated stream), perhaps cut short by a crash or a full disk; "
              "removed, compiling again"]
    assert rerun() == mended
    assert {name: os.path.getsize(cache / name) for name in entries} == sizes
    assert rerun() == []
    with open(cache / entries[0], "r+b") as entry:
        entry.truncate(sizes[entries[0]] // 2)
    assert rerun(python_options=("-W", "ignore")) == mended  # warnings ignored, the cache mended all the same
    assert rerun() == []


def test_an_entry_that_cannot_be_removed_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    """Another user's entry in a shared folder (sticky, as /tmp): JAX's own warning, shown even
    under -W ignore, named neither the file nor what to do. The warning hook runs inside JAX's
    compile, where an error would end the run."""
    from r3jax import main

    entry = tmp_path / "jit_f-0a1b-cache"
    entry.write_bytes(b"cut short")

    def not_ours(path):
        raise PermissionError(1, "Operation not permitted", path)

    monkeypatch.setattr(main.os, "remove", not_ours)
    monkeypatch.setattr(main, "jax_cache_dir", lambda: str(tmp_path))
    assert main.remove_damaged_entries(str(tmp_path), "jit_f") == (0, [f"{entry}: Operation not permitted"])
    jaxs_own = []
    show = main.mending_cache_entries(lambda *args: jaxs_own.append(args))
    show(UserWarning("Error reading persistent compilation cache entry for 'jit_f': error: Error -5 while "
                     "decompressing data"), UserWarning, "compiler.py", 1)
    assert capsys.readouterr().err.splitlines() == [
        f"warning: compile_cache {tmp_path}: an entry of 'jit_f' could not be read (error: Error -5 while decompressing "
        f"data) nor removed ({entry}: Operation not permitted); compiling it again in every run until that file is "
        "removed, or set compile_cache to a folder of your own"]
    assert jaxs_own == [] and entry.exists()
    show(UserWarning("some other warning"), UserWarning, "x.py", 1)
    assert len(jaxs_own) == 1  # any other warning goes on to the hook it wraps


def test_jaxs_own_bound_keeps_caching_beside_entries_written_without_it(tmp_path):
    """Entries JAX writes with no bound have no access-time file, which JAX's bounded cache
    (JAX_COMPILATION_CACHE_MAX_SIZE) reads for every entry at each write: without
    `date_unbounded_entries` each later compile failed to be cached, with a warning."""
    env = {k: v for k, v in ENV.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE")}
    for jax_bound, added in ((None, 1), ("250000000", 2), ("250000000", 3)):
        code = ("import sys, jax; from r3jax.main import use_compile_cache; use_compile_cache(sys.argv[1], 0.5); "
                f"jax.jit(lambda x: x + {added})(1.0).block_until_ready()")
        bound = {"JAX_COMPILATION_CACHE_MAX_SIZE": jax_bound} if jax_bound else {}
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], env={**env, **bound}, check=True,
                              timeout=120, capture_output=True, text=True)
        assert "Error writing persistent compilation cache" not in done.stderr
    assert len(_cache_entries(tmp_path / "cache")) == 3


def test_a_rerun_loads_its_kept_programs_and_repeats_the_run(tmp_path):
    """config.compile_cache keeps the SFT step, the RL update and the sampler whole
    (r3jax/programs.py): a rerun in another process loads every one of them, compiles none anew,
    and repeats the first run's numbers exactly."""
    cache = tmp_path / "cache"
    env = {k: v for k, v in ENV.items() if k not in ("JAX_COMPILATION_CACHE_DIR",
                                                      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    env["JAX_LOG_COMPILES"] = "1"  # "Finished tracing <function> ..." on stderr for every trace
    short = [*TINY_RUN, "--config.rl.steps=4", f"--config.compile_cache={cache}"]
    first = run_cli(*short, "--workdir=first", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    programs = cache / "r3jax-programs"
    kept = set(os.listdir(programs))
    assert {name.rsplit("-", 2)[0] for name in kept} == {"sft-step", "ppo-update", "sampler"}, sorted(kept)
    # a kept program compiles under its key's name; a program not kept, under its function's
    traced = lambda log: re.findall(r"Finished tracing (pinned|_generate|(?:sft_step|ppo_update|sampler)_[0-9a-f_]+) ",
                                    log)
    assert len(traced(first.stderr)) >= 3
    rerun = run_cli(*short, "--workdir=rerun", cwd=tmp_path, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert traced(rerun.stderr) == []
    assert set(os.listdir(programs)) == kept  # nothing compiled, so nothing new kept
    for want, have in zip(rl_log(tmp_path / "first"), rl_log(tmp_path / "rerun"), strict=True):
        assert {k: v for k, v in want.items() if not k.startswith(TIMING)} == \
            {k: v for k, v in have.items() if not k.startswith(TIMING)}
    assert json.load(open(tmp_path / "first" / "results.json")) == json.load(open(tmp_path / "rerun" / "results.json"))


def test_non_finite_loss_stops_with_status_3_naming_the_step(tmp_path):
    """(And config.compile_cache, the default persistent compilation cache, fills as the run compiles.)"""
    cache = tmp_path / "jit-cache"
    env = {k: v for k, v in ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    result = run_cli(*TINY_RUN, "--config.sft.lr=1e30", "--config.sft.checkpoint_every=1", f"--workdir={tmp_path}",
                     f"--config.compile_cache={cache}", env=env)
    assert os.listdir(cache)
    assert result.returncode == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: SFT step 2: loss = nan") and "last good checkpoint at step 1" in last, last
    assert "Traceback" not in result.stderr and len(read_jsonl(str(tmp_path / "sft" / "sft.jsonl"))) == 1


@pytest.mark.slow  # 100 s; in CI the protocol runs in-process (tests/test_compare.py) and its trainers in
# the main job's tests
def test_compare_mode_writes_the_comparison(tmp_path):
    """The comparison end to end at toy scale, 2 arms x 1 seed (the protocol's units, tuning and
    differences are tested in-process in test_compare.py): every arm from one SFT model under one
    token budget, results in the documented shape; a rerun reuses the finished arms."""
    output = tmp_path / "compare.json"
    args = [f"--config={ROOT}/configs/arith_compare.py", f"--workdir={tmp_path / 'run'}",
            "--config.task.options.num_train=300", "--config.task.options.num_test=16",
            "--config.task.options.validation_size=16", "--config.rl.schedule=linear",
            "--config.rl.max_new_tokens=24",
            "--config.sft.steps=20", "--config.sft.eval_every=0", "--config.rl.token_budget=400",
            "--config.rl.batch_size=8", "--config.eval.num_examples=16", "--config.eval.batch_size=16",
            "--config.compare.seeds=(0,)", "--config.compare.arms=('r3','r3-grpo')",
            "--config.compare.samples=2", "--config.compare.sample_problems=8", "--config.compare.tune_lr=()",
            "--config.rl.length_bucket=256",  # no trimming: one update shape per arm to compile
            "--config.compare.tune_continued_lr=()",
            "--config.task.options.max_steps=6", f"--config.compare.output={output}"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.load(open(output))
    assert set(summary["arms"]) == {"sft", "r3", "r3-grpo", "sft_continued"}
    assert "machine" in summary and summary["num_test_problems"] == 16 and summary["budget"]["sampled_tokens"] == 400
    assert set(summary["differences"]) == {"r3_vs_sft", "r3_vs_sft_continued"}
    for name, arm in summary["arms"].items():
        assert {"mean", "ci95", "seeds", "by_steps", "sample_accuracy", "pass_at_k"} <= set(arm), name
        assert arm["mean"] == pytest.approx(np.mean(arm["seeds"])) and arm["ci95"][0] <= arm["mean"] <= arm["ci95"][1]
        assert len(arm["seeds"]) == 1
        assert set(arm["by_steps"]) <= {"2", "3", "4", "5", "6"} and arm["by_steps"]
        assert arm["sample_accuracy"] <= arm["pass_at_k"]
        if name not in ("sft", "sft_continued"):
            assert all(tokens >= 400 for tokens in arm["tokens_sampled"]), name
    r3_minus_sft = summary["differences"]["r3_vs_sft"]
    assert r3_minus_sft["mean"] == pytest.approx(summary["arms"]["r3"]["mean"] - summary["arms"]["sft"]["mean"])
    assert summary["premise"] and set(summary["premise"]) <= {f"steps_{n}" for n in range(2, 7)}
    assert all(set(row) == {f"stage_{j}" for j in range(5)} for row in summary["premise"].values())
    units = tmp_path / "run" / "compare"
    grpo_log = read_jsonl(str(next(units.glob("r3-grpo-seed0-*/rl.jsonl"))))
    assert "vf_loss" not in grpo_log[0] and any(key.startswith("equal_groups/stage_") for key in grpo_log[0])
    log = read_jsonl(str(next(units.glob("r3-seed0-*/rl.jsonl"))))  # the linear schedule decays with the budget
    spent_before = [0] + [r["tokens_sampled"] for r in log[:-1]]
    assert len(log) >= 3 and [r["lr"] for r in log] == pytest.approx([1e-5 * (1 - t / 400) for t in spent_before])
    updates = round(np.mean(summary["arms"]["r3"]["rl_steps"]) * 2)  # rl.epochs x rl.minibatches = 2
    assert len(list(units.glob(f"sft_continued-seed0-{updates}-*"))) == 1
    assert output.with_suffix(".png").exists() and "| r3 - sft |" in output.with_suffix(".md").read_text()
    again = run_cli(*args)  # every arm's report.json exists: nothing is trained twice
    assert again.returncode == 0 and "RL " not in again.stderr
    assert json.load(open(output))["arms"] == summary["arms"]


FAST_DEFAULT = [f"--config={ROOT}/configs/arith.py", "--config.task.options.num_train=1500",
                "--config.task.options.num_test=64", "--config.sft.steps=160", "--config.sft.eval_every=0",
                "--config.rl.steps=24", "--config.rl.batch_size=16", "--config.rl.eval_every=0",
                "--config.rl.lr=3e-5",  # a larger step than the default, so 24 steps show a trend
                # T = 1, not the default's 1.3: from this 160-step SFT model, 24 steps at 1.3 did
                # not raise the reward
                "--config.rl.temperature=1.0",
                "--config.eval.num_examples=64", "--config.eval.batch_size=32",
                # shorter chains and a wider model than the default's: 160 SFT steps then learn
                # enough for RL's reward to move within 24 steps
                "--config.task.options.max_steps=6", "--config.task.options.max_value=50",
                "--config.model.hidden_size=128", "--config.model.intermediate_size=384", "--config.model.num_layers=4",
                "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.sft.max_length=256",
                "--config.rl.max_new_tokens=80", "--config.rl.max_prompt_length=160", "--config.eval.max_new_tokens=80"]


@pytest.mark.slow
def test_embedded_default_learns(tmp_path):
    """The README's main job with a reduced budget (about 4.5 minutes): RL reward rises. In CI the
    update's learning is tested on toy tasks (test_ppo.py) and the job's outputs by the killed-run test."""
    result = run_cli(*FAST_DEFAULT, "--workdir=run", cwd=tmp_path)  # a relative workdir, as users type
    assert result.returncode == 0, result.stderr[-3000:]
    tmp_path = tmp_path / "run"
    log = rl_log(str(tmp_path))
    rewards = np.array([r["reward"] for r in log])
    assert len(rewards) == 24 and all("accuracy" in r and "accuracy/stage_0" in r for r in log)
    assert rewards[-8:].mean() > rewards[:8].mean(), rewards
    _assert_main_job_outputs(tmp_path, max_update_shapes=8)


@pytest.mark.slow
def test_embedded_default_full(tmp_path):
    """The README's main command as documented (about 10.5 minutes on the 2-core CPU)."""
    result = run_cli(f"--config={ROOT}/configs/arith.py", "--workdir=run", cwd=tmp_path, timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.load(open(tmp_path / "run" / "results.json"))
    assert results["sft"]["accuracy"] > 0.7  # SFT to its plateau from scratch; 0.877 measured
    assert results["r3-mixed"]["steps"] == 100
    assert "r3-mixed - sft: " in (tmp_path / "run" / "results.md").read_text()


def run_in_process(capsys, config_file: str, workdir, **overrides) -> tuple[int, str, str]:
    """`python -m r3jax.main --config=CONFIG_FILE --config.KEY=VALUE...` in this process, from the
    parsed config on: (exit status, stdout, stderr). Keys are dotted, with "__" for ".". """
    from r3jax import main

    config = config_lib.load_config_file(*config_file.split(":", 1))
    config.update({"mesh": (-1, 1, 1), "eval": {**config.eval.to_dict(), "batch_size": 16}})
    for key, value in overrides.items():
        *sections, name = key.split("__")
        target = config
        for section in sections:
            target = target[section]
        target[name] = value
    code = 0
    try:
        main.run(config, str(workdir))
    except SystemExit as stopped:
        code = stopped.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def broken_inputs(tmp_path, hf_dir):
    """Files for the one-line errors: a model of an unsupported type, a tokenizer larger than the
    model's vocabulary, a JSONL file with a broken line, a workdir made by another config."""
    unsupported = tmp_path / "gpt2"
    unsupported.mkdir()
    hf_config = json.load(open(os.path.join(hf_dir, "config.json")))
    json.dump({**hf_config, "model_type": "gpt2"}, open(unsupported / "config.json", "w"))
    texts = [" ".join(chr(97 + (i * 7 + j * 3) % 26) + chr(97 + (i * j) % 26) for j in range(30)) for i in range(300)]
    big_tokenizer = tokenizer.train_sentencepiece(texts, str(tmp_path / "big"), vocab_size=200)
    broken = tmp_path / "train.jsonl"
    broken.write_text('{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n{"question": \n')
    other = tmp_path / "other_run"
    (other / "sft").mkdir(parents=True)  # that run made something: its config holds the workdir
    stored = config_lib.base_config()
    stored.task.name = "gsm8k"
    (other / "config.json").write_text(stored.to_json_best_effort())
    truncated = tmp_path / "crashed_run"
    truncated.mkdir()
    (truncated / "config.json").write_text(stored.to_json_best_effort()[:100])  # a write cut short
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    adapter = tmp_path / "adapter"  # as a LoRA run exports it, beside its merged model
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "base_model_name_or_path": '
                                                 '"/runs/x/sft/best"}')
    interrupted = tmp_path / "killed_run" / "sft" / "best"  # its export killed between its two renames
    interrupted.parent.mkdir(parents=True)
    (interrupted.parent / "best.partial").mkdir()
    return {"unsupported": unsupported, "big_tokenizer": big_tokenizer, "broken": broken, "other": other,
            "truncated": truncated, "hf": hf_dir, "tmp": tmp_path, "a_file": a_file, "adapter": adapter,
            "interrupted": interrupted}


@pytest.mark.parametrize("overrides, named", [
    ({"model__path": "{unsupported}", "tokenizer__path": "{big_tokenizer}"}, "model_type 'gpt2' is not supported"),
    ({"model__path": "{hf}", "tokenizer__path": "{big_tokenizer}"}, "config.tokenizer.path: the tokenizer has 200 ids"),
    ({"model__path": "{hf}"}, "no tokenizer here"),
    ({"sft__max_length": 8}, "config.sft.max_length: 8 tokens fit none"),
    ({"workdir": "{other}"}, "was made by a different config:"),
    ({"workdir": "{truncated}"}, "crashed_run/config.json cannot be read"),
    ({"mode": "rl"}, "config.rl.init: '' starts RL from"),
    ({"mode": "rl", "rl__init": "{tmp}"}, "config.rl.init: {tmp} has no config.json"),
    ({"mode": "rl", "rl__init": "{adapter}"}, "config.rl.init: {adapter} is a PEFT adapter, not a model: give the "
     "model it was trained on (/runs/x/sft/best) as rl.init, and this directory as model.lora.init_from"),
    ({"mode": "rl", "rl__init": "{interrupted}"}, "config.rl.init: SFT checkpoint directory {interrupted} not found "
     "({interrupted}.partial is an export of it being written, or interrupted: rerun the run that exports it)"),
    ({"mode": "eval"}, "config.model.path: mode=eval evaluates the model in this HF directory"),
    ({"workdir": "{a_file}"}, "--workdir={a_file}: a file, not a directory"),
    ({"workdir": "{a_file}/run"}, "--workdir={a_file}/run: cannot write there (Not a directory)"),
    ({"task__options__max_stepz": 3}, "config.task.options.max_stepz: task arith takes no such option"),
], ids=["model_type", "vocab", "no-tokenizer", "max_length", "workdir", "truncated-config", "rl-without-sft",
        "rl-init-not-a-model", "rl-init-an-adapter", "rl-init-interrupted", "eval-without-model", "workdir-a-file",
        "workdir-unwritable", "task-option"])
def test_user_mistakes_end_in_one_line_exit_2(overrides, named, broken_inputs, capsys):
    overrides = {k: v.format(**broken_inputs) if isinstance(v, str) else v for k, v in overrides.items()}
    workdir = overrides.pop("workdir", broken_inputs["tmp"] / "run")
    code, _, err = run_in_process(capsys, f"{ROOT}/configs/arith.py", workdir, task__options__num_train=300,
                                  sft__steps=1, **overrides)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named.format(**broken_inputs) in errors[0], err[-2000:]


def test_a_hub_id_is_read_from_the_local_hugging_face_cache_and_nothing_is_downloaded(broken_inputs, hf_dir, tmp_path,
                                                                                       capsys, monkeypatch):
    import shutil

    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--org--tiny-llama"  # as `hf download org/tiny-llama` lays it out
    shutil.copytree(hf_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # any download would fail
    run = lambda **model: run_in_process(capsys, f"{ROOT}/configs/arith.py", tmp_path / "run", task__options__num_train=300,
                                         sft__steps=1, tokenizer__path=str(broken_inputs["big_tokenizer"]), **model)
    code, out, err = run(model__path="org/tiny-llama")
    assert f"model.path: org/tiny-llama from the local Hugging Face cache, {repo / 'snapshots' / 'abc123'}" in out
    # the cached model's config was read: its vocabulary is smaller than this tokenizer's
    assert code == 2 and "config.tokenizer.path: the tokenizer has 200 ids" in err, err[-2000:]
    code, _, err = run(model__path="org/not-cached")
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: config.model.path: model directory org/not-cached not found nor in the local Hugging Face cache "
        "(r3jax downloads nothing: `hf download org/not-cached` first, or give a local directory)")


def test_a_hub_id_at_a_revision_is_read_from_that_snapshot(tmp_path, monkeypatch):
    """org/name@revision: a branch or tag through its ref, a commit by its full hash; nothing else."""
    import huggingface_hub.constants

    from r3jax.models import hf

    repo = tmp_path / "models--org--model"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for snapshot, ref in (("abc123", "main"), ("def456", "v2"), (commit, None)):
        (repo / "snapshots" / snapshot).mkdir(parents=True)
        (repo / "snapshots" / snapshot / "config.json").write_text("{}")
        if ref:
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / ref).write_text(snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # any download would fail
    snapshots = {name: hf.cached_snapshot(name) for name in
                 ("org/model", "org/model@main", "org/model@v2", f"org/model@{commit}", "org/model@v3", "org/other@v2")}
    assert snapshots == {"org/model": str(repo / "snapshots" / "abc123"),
                         "org/model@main": str(repo / "snapshots" / "abc123"),
                         "org/model@v2": str(repo / "snapshots" / "def456"),
                         f"org/model@{commit}": str(repo / "snapshots" / commit),
                         "org/model@v3": None, "org/other@v2": None}


def test_a_workdir_in_use_by_another_run_is_refused_until_that_run_ends(tmp_path, capsys):
    """Two runs in one workdir wrote over each other's checkpoints; one crashed with a traceback."""
    from r3jax import workdir as workdir_lib

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from r3jax import workdir; "
                               "workdir.lock(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(tmp_path)],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_in_process(capsys, f"{ROOT}/configs/arith.py", tmp_path, task__options__num_train=300)
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert f"error: --workdir={tmp_path}: in use by another run (pid {holder.pid} on " in err
        assert not (tmp_path / "config.json").exists()  # refused before touching the workdir
    finally:
        holder.kill()  # SIGKILL: no chance to unlock, and no stale lock left behind
        holder.wait()
    assert workdir_lib.lock(str(tmp_path)) is None


def test_a_bad_value_in_a_config_file_names_the_line_that_set_it(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text("from configs.arith import get_config as arith\n\n\ndef get_config():\n    c = arith()\n"
                    "    c.rl.temperature = -1.0\n    return c\n")
    result = run_cli(f"--config={path}", f"--workdir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"error: config.rl.temperature: must be positive, got -1.0 (set in {path}:6: c.rl.temperature = -1.0)"), \
        result.stderr[-2000:]


def test_broken_jsonl_line_is_named(broken_inputs, capsys):
    code, _, err = run_in_process(capsys, f"{ROOT}/configs/gsm8k.py", broken_inputs["tmp"] / "run",
                                  model__path=broken_inputs["hf"], task__options__train_path=str(broken_inputs["broken"]))
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: {broken_inputs['broken']}:2: not valid JSON")


def test_help_lists_every_key_with_its_default_and_meaning(capsys):
    result = run_cli("--help", "--config=configs/arith.py")
    assert result.returncode == 0
    out = result.stdout
    documented = config_lib.documented_keys()
    leaves = {key for key in config_lib.flatten(config_lib.base_config()) if not key.startswith("task.options.")}
    assert {key.name for key in documented} == leaves | {"task.options"}  # its every-task keys: its meaning
    reference = open(os.path.join(ROOT, "docs", "configuration.md")).read()
    for key in documented:
        assert f"  {key.name} = {key.default!r}" in out and key.meaning[:40] in out, key.name
        assert f"`{key.name}`" in reference, f"{key.name} is not in docs/configuration.md"
    assert "  sft.steps = 1000 -> 2000" in out and "  tokenizer.vocab_size = 256 -> 160" in out


@pytest.mark.parametrize("init", [True, False], ids=["rl.init", "the-workdirs-sft-model"])
def test_rl_mode_announces_the_model_it_loads(init, tmp_path, capsys, monkeypatch):
    """--config.mode=rl names the model it starts from at start-up (and builds no from-scratch one):
    rl.init's, or without it the workdir's own SFT model."""
    from r3jax.rollout import Policy
    from r3jax.train import job, sft

    arith = tasks.get("arith", num_train=200)
    texts = [arith.prompt(d.question) + d.response for d in arith.demonstrations("train")]
    tok = tokenizer.load(tokenizer.train_sentencepiece(texts, str(tmp_path / "tok"), vocab_size=TINY.vocab_size))
    cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size)
    model_dir = tmp_path / "sft" if init else tmp_path / "run" / "sft" / "best"
    sft.export(str(model_dir), Policy(cfg, tiny_params(cfg), tok, None))
    monkeypatch.setattr(job.rl, "train", lambda *args: None)  # the run stops as RL begins
    monkeypatch.setattr(job, "init_params", None)  # a from-scratch model would fail here
    code, out, _ = run_in_process(capsys, f"{ROOT}/configs/arith.py", tmp_path / "run", mode="rl",
                                  **({"rl__init": str(model_dir)} if init else {}))
    assert code == 75
    assert f"model: llama, {cfg.num_params():,} parameters ({model_dir}), 2 layers" in out


def test_own_data_and_reward_end_to_end(tmp_path, capsys, monkeypatch):
    """README's example: SFT then R^3 on a user's JSONL file with the user's reward function."""
    arith = tasks.get("arith", num_train=120, num_test=16, max_steps=3)
    for split, path in (("train", tmp_path / "train.jsonl"), ("test", tmp_path / "test.jsonl")):
        path.write_text("".join(json.dumps({"question": d.question, "rationale": d.rationale.strip(), "answer": d.answer})
                                + "\n" for d in arith.demonstrations(split)))
    (tmp_path / "my_main_rewards.py").write_text("def exact(response, gold):\n    return response.rstrip().endswith(gold)\n")
    monkeypatch.chdir(tmp_path)
    options = {"train_path": str(tmp_path / "train.jsonl"), "test_path": str(tmp_path / "test.jsonl"),
               "validation_size": 16, "reward_fn": "my_main_rewards:exact"}
    code, out, err = run_in_process(
        capsys, f"{ROOT}/configs/arith.py", tmp_path / "run", task__name="jsonl", task__options=options,
        model__hidden_size=32, model__intermediate_size=64, model__num_layers=2, model__head_dim=8,
        sft__steps=2, sft__eval_every=0, rl__steps=2, rl__batch_size=8, rl__max_new_tokens=16, rl__eval_every=0,
        rl__separate_critic=False, eval__num_examples=16, eval__max_new_tokens=16)
    assert code == 0, err[-3000:]
    results = json.load(open(tmp_path / "run" / "results.json"))
    assert set(results) == {"sft", "r3-mixed"} and [r["step"] for r in rl_log(str(tmp_path / "run"))] == [1, 2]
    assert "answered" not in results["sft"]  # the user's reward function says nothing of reading an answer
    assert f"results written to {tmp_path / 'run'}" in out


def test_sft_then_rl_in_one_workdir_keeps_the_sft_row(tmp_path, capsys):
    """mode=sft, then mode=rl from the workdir's SFT model: the second run's table still holds the
    SFT model's row and the paired R^3 - SFT difference, as does mode=rl in another workdir with
    rl.init=<workdir>/sft/best; with other test problems it leaves it out."""
    small = dict(task__options__num_train=200, task__options__validation_size=16, task__options__num_test=16,
                 task__options__max_steps=3, model__hidden_size=32, model__intermediate_size=64,
                 model__head_dim=8, sft__steps=2, sft__eval_every=0, rl__steps=1, rl__batch_size=8,
                 rl__max_new_tokens=16, rl__eval_every=0, eval__num_examples=16, eval__max_new_tokens=16)
    run = tmp_path / "run"
    code, _, err = run_in_process(capsys, f"{ROOT}/configs/arith.py", run, mode="sft", **small)
    assert code == 0, err[-3000:]
    sft_results = json.load(open(run / "results.json"))
    code, out, err = run_in_process(capsys, f"{ROOT}/configs/arith.py", run, mode="rl", **small)
    assert code == 0, err[-3000:]
    results = json.load(open(run / "results.json"))
    assert set(results) == {"sft", "r3-mixed"} and results["sft"] == sft_results["sft"]
    assert 0.0 <= results["r3-mixed"]["answered"] <= 1.0 and "answered" in rl_log(str(run))[0]
    logged = {key for record in [*read_jsonl(str(run / "sft" / "sft.jsonl")), *rl_log(str(run))] for key in record}
    guide = open(os.path.join(ROOT, "docs", "guide.md")).read().split("## What a run logs")[1].split("\n## ")[0]
    undocumented = {key for key in logged - {"step"} if f"`{key.split('/stage_')[0]}`" not in guide}
    assert not undocumented, f"docs/guide.md, What a run logs: {sorted(undocumented)}"
    assert "r3-mixed - sft: " in (run / "results.md").read_text() and "| sft |" in out

    other = tmp_path / "rl_elsewhere"  # RL in its own workdir from this one's SFT model: the same row
    code, _, err = run_in_process(capsys, f"{ROOT}/configs/arith.py", other, mode="rl",
                                  rl__init=str(run / "sft" / "best"), **small)
    assert code == 0, err[-3000:]
    assert json.load(open(other / "results.json"))["sft"] == sft_results["sft"]
    assert "r3-mixed - sft: " in (other / "results.md").read_text()

    predictions = run / "sft_predictions.jsonl"
    predictions.write_text("".join(line.replace('"id": "', '"id": "other-') + "\n"
                                   for line in predictions.read_text().splitlines()))
    code, out, err = run_in_process(capsys, f"{ROOT}/configs/arith.py", run, mode="rl", **small)
    assert code == 0, err[-3000:]
    assert set(json.load(open(run / "results.json"))) == {"r3-mixed"}


def test_the_readmes_own_data_example_runs(tmp_path, capsys, monkeypatch):
    """README's "Your data" example as written, on a small budget: its snippet writes the JSONL
    files, and configs/jsonl.py trains and evaluates on them."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    snippet = re.search(r"^python - <<'PY'[^\n]*\n(.*?)^PY$", readme, re.S | re.M).group(1)
    monkeypatch.chdir(tmp_path)
    exec(snippet, {})
    code, out, err = run_in_process(
        capsys, f"{ROOT}/configs/jsonl.py", tmp_path / "run", task__options__train_path="my_train.jsonl",
        task__options__test_path="my_test.jsonl", model__hidden_size=32, model__intermediate_size=64, model__head_dim=8,
        sft__steps=2, sft__eval_every=2, sft__eval_examples=8, rl__steps=2, rl__batch_size=8, rl__max_new_tokens=16,
        rl__eval_every=0, eval__max_new_tokens=16)
    assert code == 0, err[-3000:]
    results = json.load(open(tmp_path / "run" / "results.json"))
    assert set(results) == {"sft", "r3-mixed"} and len(read_jsonl(tmp_path / "run" / "sft_predictions.jsonl")) == 20


def test_lora_run_on_an_hf_model_end_to_end(tmp_path, capsys):
    """SFT then R^3 with rank-4 adapters on a tiny HF Llama (a separate critic, LoRA too): the start-up
    line counts trainable and frozen weights, both phases export a folded model and a PEFT adapter
    for the model they started from, and the base's weights come back out where no adapter sits."""
    from safetensors.numpy import load_file

    arith = tasks.get("arith", num_train=120)
    texts = [arith.prompt(d.question) + d.response for d in arith.demonstrations("train")]
    tok_file = tokenizer.train_sentencepiece(texts, str(tmp_path / "tok"), vocab_size=120)
    model_dir = tmp_path / "model"
    make_hf_model("llama", str(model_dir), vocab_size=tokenizer.load(tok_file).vocab_size)
    code, out, err = run_in_process(
        capsys, f"{ROOT}/configs/arith.py", tmp_path / "run", model__path=str(model_dir),
        tokenizer__path=tok_file, model__lora__rank=4, model__lora__alpha=8.0, model__lora__targets="(q|v|down)_proj",
        sft__steps=2, sft__eval_every=0, rl__steps=2, rl__batch_size=8, rl__max_new_tokens=16, rl__eval_every=0,
        rl__separate_critic=True, rl__lr=1e-3, eval__num_examples=16, eval__max_new_tokens=16,
        task__options__reward_fn="helpers:length_parity_reward")  # rewards a random model earns half the time
    assert code == 0, err[-3000:]
    run = tmp_path / "run"
    assert "LoRA rank 4 on q_proj, v_proj, down_proj: trainable 3,200 parameters (0.0 MiB), frozen" in out
    for export, base in ((run / "sft" / "best", model_dir), (run / "rl" / "final", run / "sft" / "best")):
        adapter_config = json.load(open(export / "adapter" / "adapter_config.json"))
        assert adapter_config["base_model_name_or_path"] == str(base) and adapter_config["r"] == 4
        folded, original = load_file(str(export / "model.safetensors")), load_file(str(base / "model.safetensors"))
        assert set(folded) == set(original)
        for name in folded:  # only the adapted projections differ from the model training started from
            assert np.array_equal(folded[name], original[name]) != any(p in name for p in ("q_proj", "v_proj", "down_proj")), name
    assert set(json.load(open(run / "results.json"))) == {"sft", "r3-mixed"}


@pytest.mark.parametrize("given, expected", [
    ("--xla_force_host_platform_device_count=2", "--xla_force_host_platform_device_count=2 "
                                                 "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"),
    ("--xla_cpu_experimental_ynn_fusion_type=dot", "--xla_cpu_experimental_ynn_fusion_type=dot"),
], ids=["added", "the-users-own-wins"])
def test_importing_r3jax_limits_xla_cpus_ynnpack_fusions_unless_told(given, expected):
    code = "import os, r3jax, jax; jax.numpy.ones(2).block_until_ready(); print(os.environ['XLA_FLAGS'])"
    result = subprocess.run([sys.executable, "-c", code], env={**ENV, "XLA_FLAGS": given}, capture_output=True,
                            text=True, timeout=120, check=True)
    assert result.stdout.strip() == expected
