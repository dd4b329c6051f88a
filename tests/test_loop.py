"""The SFT and RL loops in-process on a tiny model: a stop signal mid-run saves and returns, and
the resumed run ends exactly where an uninterrupted one does (logs and weights)."""
import dataclasses
import os
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from helpers import TINY, tiny_params
from r3jax import config as config_lib, settings, sharding, tasks, tokenizer
from r3jax.checkpoint import StopSignal
from r3jax.metrics import read_jsonl
from r3jax.models import lora
from r3jax.rollout import Policy
from r3jax.tasks.answers import Score
from r3jax.train import rl, sft

TIMING = ("time/", "sample_tokens_per_s", "compiled/")  # facts of the process, not of the trajectory


class StopDuring:
    """A stop signal that arrives once the phase's log has `steps` lines."""

    def __init__(self, log: str, steps: int):
        self.log, self.steps = log, steps

    @property
    def requested(self) -> bool:
        return len(read_jsonl(self.log)) >= self.steps


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    task = tasks.get("arith", num_train=80, num_test=8, max_steps=3, validation_size=8)
    texts = [task.prompt(d.question) + d.response for d in task.demonstrations("train")]
    tok = tokenizer.load(tokenizer.train_sentencepiece(
        texts, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=TINY.vocab_size))
    cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    config = config_lib.base_config()
    config.sft.update(steps=5, batch_size=4, checkpoint_every=100, max_length=256, eval_every=2, eval_examples=4)
    config.rl.update(steps=5, batch_size=8, group_size=2, estimator="grpo", dynamic_sampling=True,
                     max_sampling_rounds=2, max_new_tokens=8, max_prompt_length=160, checkpoint_every=100, lr=1e-4)
    config.eval.update(batch_size=8, max_new_tokens=8)
    return task, tok, cfg, mesh, config


def _same_logs(want: list[dict], have: list[dict]) -> None:
    assert [r["step"] for r in have] == [r["step"] for r in want]
    for a, b in zip(want, have):
        for key, value in a.items():
            if not key.startswith(TIMING):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (a["step"], key)


def test_sft_stopped_mid_run_resumes_to_the_same_model(tiny_setup, tmp_path):
    task, tok, cfg, mesh, config = tiny_setup
    run = lambda workdir, stop: sft.train(settings.of(config), Policy(cfg, tiny_params(cfg), tok, mesh), task, str(workdir), stop)
    assert run(tmp_path / "whole", StopSignal()) == str(tmp_path / "whole" / "sft" / "best")
    assert run(tmp_path / "cut", StopDuring(str(tmp_path / "cut" / "sft" / "sft.jsonl"), 3)) is None
    assert not (tmp_path / "cut" / "sft" / "last").exists() and (tmp_path / "cut" / "sft" / "checkpoints" / "3").exists()
    run(tmp_path / "cut", StopSignal())
    whole, cut = (read_jsonl(str(tmp_path / d / "sft" / "sft.jsonl")) for d in ("whole", "cut"))
    _same_logs(whole, cut)
    assert [r["step"] for r in whole if "eval/accuracy" in r] == [2, 4, 5]  # every 2 steps and the last
    for name in ("last", "best"):
        assert (tmp_path / "cut" / "sft" / name / "model.safetensors").read_bytes() == \
            (tmp_path / "whole" / "sft" / name / "model.safetensors").read_bytes(), name
    assert (tmp_path / "cut" / "sft" / "sft_curves.png").exists()


def test_finished_sft_is_skipped_and_more_steps_extend_it(tiny_setup, tmp_path, capsys):
    task, tok, cfg, mesh, config = tiny_setup
    config = config.copy_and_resolve_references()
    config.sft.update(steps=2, eval_every=0)
    run = lambda: sft.train(settings.of(config), Policy(cfg, tiny_params(cfg), tok, mesh), task, str(tmp_path), StopSignal())
    run()
    first_export = (tmp_path / "sft" / "last" / "model.safetensors").stat().st_mtime
    best = tmp_path / "sft" / "best"
    weights = (best / "model.safetensors").read_bytes()
    shutil.copytree(best, str(best) + ".replaced")  # as an export killed between its renames leaves it
    (tmp_path / "sft" / "best.replaced" / "model.safetensors").write_bytes(b"the earlier export")
    os.rename(best, str(best) + ".partial")
    run()
    out, err = capsys.readouterr()
    assert "finished at step 2" in out and (f"warning: {best}: an export was interrupted between its two renames; "
                                            f"completed from {best}.partial\n") in err
    assert (best / "model.safetensors").read_bytes() == weights  # the interrupted export, completed
    config.sft.steps = 3
    run()
    assert "SFT: extending from step 2 to 3" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(str(tmp_path / "sft" / "sft.jsonl"))] == [1, 2, 3]
    assert (tmp_path / "sft" / "last" / "model.safetensors").stat().st_mtime > first_export


@pytest.mark.parametrize("lora_rank, strategy, pack", [(0, "mixed", False), (4, "mixed", False),
                                                       (0, "adaptive", False), (0, "hint_on_failure", True)],
                         ids=["full", "lora", "adaptive", "hint-packed"])
def test_rl_stopped_mid_run_resumes_exactly_with_dynamic_sampling(tiny_setup, tmp_path, lora_rank, strategy, pack):
    """With LoRA (rank 4, the base as the KL reference) the same, and the base stays as it was; with
    the adaptive curriculum and with hints on failure the same, their start points and hints restored
    from the checkpoint; the hinted run also packs its update batches (rows left empty included)."""
    _, tok, cfg, mesh, config = tiny_setup
    config = config.copy_and_resolve_references()
    config.rl.update(strategy=strategy, adaptive_band=(0.5, 0.5001), pack=pack)  # a pair of samples moves or stays
    # a reward the random policy earns half the time: some groups are dropped, the others train
    task = tasks.get("arith", num_train=80, num_test=8, max_steps=3, validation_size=8,
                     reward_fn="helpers:length_parity_reward")
    cfg = cfg.replace(lora_rank=lora_rank, lora_targets=config_lib.LORA_MODULES if lora_rank else ())
    policy = tiny_params(cfg, scale=3.0)
    run = lambda workdir, stop: rl.train(settings.of(config), Policy(cfg, jax.tree.map(np.copy, policy), tok, mesh), task,
                                         str(workdir), stop)
    whole = run(tmp_path / "whole", StopSignal())
    assert run(tmp_path / "cut", StopDuring(str(tmp_path / "cut" / "rl.jsonl"), 2)) is None
    assert (tmp_path / "cut" / "checkpoints" / "2").exists()
    resumed = run(tmp_path / "cut", StopSignal())
    expected, got = (read_jsonl(str(tmp_path / d / "rl.jsonl")) for d in ("whole", "cut"))
    # dynamic sampling did drop groups and sample again, so data positions ran ahead of steps
    assert sum(r["dropped_groups"] for r in expected) > 0 and max(r["sampling_rounds"] for r in expected) == 2
    _same_logs(expected, got)
    assert (resumed["steps"], resumed["tokens_sampled"]) == (whole["steps"], whole["tokens_sampled"]) == (
        5, expected[-1]["tokens_sampled"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
                 resumed["params"], whole["params"])
    trained, start = lora.trainable_and_frozen(cfg, whole["params"])[0], lora.trainable_and_frozen(cfg, policy)[0]
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(start)))
    if lora_rank:
        jax.tree.map(np.testing.assert_array_equal, lora.split(whole["params"])[1], lora.split(policy)[1])
    if strategy != "mixed" and not lora_rank:  # start points or hints moved, and alike when resumed (the logs agree)
        assert len({r["start_point/mean_stage"] for r in expected}) > 1
    assert all(0 < r["update/real_fraction"] <= 1 for r in expected)  # packing's gain: tests/test_trim.py, bench
    if strategy == "hint_on_failure":
        assert sum(r["hinted_fraction"] for r in expected) > 0
        assert (tmp_path / "whole" / "rl_start_point.png").exists()


def test_a_step_that_raises_saves_the_last_logged_step_and_a_rerun_resumes_there(tiny_setup, tmp_path, capsys):
    """A user's reward function that breaks at step 4 (checkpoints every 100 steps) loses no
    finished step: step 3 is saved before the error ends the run, and the rerun resumes there."""
    task, tok, cfg, mesh, config = tiny_setup
    log = tmp_path / "rl.jsonl"

    def parity_until_three_steps(response: str, gold: str) -> Score:
        if len(read_jsonl(str(log))) >= 3:
            raise RuntimeError("the grader broke")
        return Score(float(len(response) % 2), False, None)

    task = tasks.get("arith", num_train=80, num_test=8, max_steps=3, validation_size=8)
    task.reward_fn = parity_until_three_steps
    run = lambda: rl.train(settings.of(config), Policy(cfg, tiny_params(cfg, scale=3.0), tok, mesh), task,
                           str(tmp_path), StopSignal())
    with pytest.raises(RuntimeError, match="the grader broke"):
        run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3"]
    assert "RL mixed: step 4 failed; saved step 3, where a rerun resumes" in capsys.readouterr().err
    task.reward_fn = lambda response, gold: Score(float(len(response) % 2), False, None)
    assert run()["steps"] == 5
    assert "RL mixed: resuming at step 3 (3 of 5 steps)" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(str(log))] == [1, 2, 3, 4, 5]


def test_a_save_that_fails_after_a_failed_step_leaves_the_step_its_own_error(capsys):
    """Any failure of that save is reported, not only the storage's: the step's error is the one
    the run ends with."""
    from r3jax.train import loop

    class Unsaving:
        def latest_step(self):
            return 2

        def save(self, step, state, meta):
            raise ValueError("Unsupported type: <class 'object'>")

    loop._save_before_failing("RL mixed", Unsaving(), {"w": jax.numpy.ones(2)}, {"step": 3})
    assert ("RL mixed: step 4 failed, and saving step 3 failed too: Unsupported type: <class 'object'>"
            in capsys.readouterr().err)


def test_a_first_signal_asks_for_a_stop_and_a_second_stops_at_once(capsys):
    """A long evaluation or step would otherwise hold a Ctrl-C for minutes."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stop = StopSignal()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert stop.requested and "SIGINT: stopping after this step" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
