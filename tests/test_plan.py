"""The planner: its compiled memory agrees with the real run's, it finds the weight all-gathers of
a training-layout decode step (and none in the replicated rollout layout), and bad input is one
line with status 2."""
import importlib.util
import os
import sys
import runpy

import jax
import pytest

from r3jax import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():
    c = runpy.run_path(os.path.join(ROOT, "configs", "arith.py"))["get_config"]()
    c.model.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   scan_layers=True, remat="full")
    c.mesh = (1, -1, 1)
    c.rl.update(rollout_mesh=(-1, 1, 1), batch_size=16, max_new_tokens=32, max_prompt_length=32, pack=True)
    c.sft.update(batch_size=16, max_length=64)
    return c


@pytest.fixture(scope="module")
def tiny_plan():
    config = _tiny_config()
    model_cfg = plan.model_config_for(config, None)
    return config, model_cfg, plan.plan(config, model_cfg, progress=lambda _: None, rollout_tokens=16)


def test_decode_collectives_found_in_the_training_layout_only(tiny_plan):
    _, _, result = tiny_plan
    decode = result["decode_collective_bytes"]
    assert decode["rollout"] <= 0.01 * result["weight_bytes"]
    # FSDP over 8 devices gathers about 7/8 of every weight on every step; the layer scan's body
    # runs once per layer and is counted so
    assert decode["training"] >= 0.5 * result["weight_bytes"], (decode, result["weight_bytes"])


def test_planned_memory_agrees_with_the_real_update(tiny_plan):
    config, model_cfg, result = tiny_plan
    update, args = plan.concrete_phase(config, model_cfg, "ppo_update")
    real = update.lower(*args).compile().memory_analysis()
    planned = result["phases"]["ppo_update"]
    for key, value in (("temp_bytes", real.temp_size_in_bytes), ("argument_bytes", real.argument_size_in_bytes)):
        assert 0.5 <= planned[key] / value <= 2.0, (key, planned[key], value)


def test_an_fsdp_sft_step_moves_each_weight_about_three_times(tiny_plan):
    """FSDP over 8 devices: each weight all-gathered for the forward and again for the backward,
    each gradient reduced once, about 3x the weight bytes. Left to sharding propagation, the
    residual stream took the weights' layout and the step moved 30x (docs/experiments.md)."""
    _, _, result = tiny_plan
    moved = result["phases"]["sft_step"]["collective_bytes"]
    assert sum(moved.values()) <= 4 * result["weight_bytes"], (moved, result["weight_bytes"])
    assert moved["all-to-all"] == 0


def test_packed_update_is_planned_at_its_real_tokens(tiny_plan):
    """Rollouts of 16 real tokens of the 64 a row can hold pack 4 to a row: 4 rows, rounded up to 8
    for the 8 batch shards, instead of 16: the packed update's compute is at most about half the
    padded one's (XLA counts 0.28 here)."""
    config, _, result = tiny_plan
    assert plan.packed_rows(config.rl, 16, 8) == (8, 64)
    assert plan.packed_rows(config.rl, 16, 1) == (4, 64) and plan.packed_rows(config.rl, 17, 1) == (6, 64)
    assert result["packed_update_rollout_tokens"] == 16
    assert 0.1 < result["packed_update_flops_ratio"] < 0.6
    lines = plan.report_lines(result | {"fits": True, "knobs_applied": []}, 80e9)
    assert any("packed update" in line for line in lines)
    assert lines[0].startswith(f"{result['num_params']:,} parameters on 8 devices")  # a tiny model is not "0.00B"


def test_a_plan_for_other_devices_runs_splash_per_device(tiny_plan):
    """`devices`: a plan for 4 of the 8 devices (bench/tpu_compile.py gives a TPU slice's chips)
    holds about twice the 8-device plan's weights per device; splash, under shard_map, compiles in
    every phase (interpreted here)."""
    config, model_cfg, eight = tiny_plan
    result = plan.plan(config, model_cfg.replace(attention_impl="splash"), progress=lambda _: None, rollout_tokens=16,
                       devices=jax.devices()[:4])
    assert result["devices"] == 4 and result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert result["param_bytes_per_device"] == pytest.approx(2 * eight["param_bytes_per_device"], rel=0.05)


def test_lora_plan_keeps_optimizer_state_for_adapters_only(tiny_plan):
    """The same run with rank-4 adapters on a bfloat16 base: no reference copy, Adam moments for the
    adapters alone, and a frozen base of half the float32 reference's bytes."""
    config, _, full = tiny_plan
    config = config.copy_and_resolve_references()
    config.model.lora.update(rank=4, base_dtype="bfloat16")
    model_cfg = plan.model_config_for(config, None)
    assert model_cfg.lora_rank == 4 and model_cfg.param_dtype == "bfloat16"
    result = plan.plan(config, model_cfg, progress=lambda _: None)
    assert result["reference_bytes_per_device"] == 0 < full["reference_bytes_per_device"]
    assert result["frozen_bytes_per_device"] == full["reference_bytes_per_device"] // 2
    # Adam's two moments of what trains (the adapters of policy and critic, the value head), nothing else
    assert result["optimizer_state_bytes_per_device"] == pytest.approx(2 * result["param_bytes_per_device"], rel=0.01)
    assert result["param_bytes_per_device"] < full["param_bytes_per_device"] / 2


def test_collective_bytes_counts_loop_bodies_by_trip_count():
    hlo = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[64]{0} all-gather(f32[8]{0} %x), dimensions={0}
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = pred[] constant(true)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %ar = bf16[4,4]{1,0} all-reduce(bf16[4,4]{1,0} %y), to_apply=%add
}
"""
    moved = plan.collective_bytes(hlo)
    assert moved["all-gather"] == 5 * 64 * 4 and moved["all-reduce"] == 16 * 2


@pytest.mark.parametrize("args, named", [
    (["--config=configs/gsm8k.py", "--model=llama-3-70b"], "unknown preset"),
    (["--config=configs/gsm8k.py", "--set", "model.path=/nonexistent"], "/nonexistent has no config.json"),
    (["--config=configs/gsm8k.py", "--set", "rl.kl_coef"], "--set rl.kl_coef: expected KEY=VALUE"),
    (["--config=configs/gsm8k.py", "--config.model.path=/nonexistent"], "/nonexistent has no config.json"),
    (["--config=configs/gsm8k.py", "--model=llama-2-7b", "--devices=6", "--config.mesh=(1,4,1)"], "config.mesh"),
    (["--config=configs/paper.py:gsm8k", "--model=qwen3-0.6b", "--devices=3"],
     "config.sft.batch_size: 64 is not a multiple of the data-parallel size 3"),
    (["--config=configs/gsm8k.py", "--model=llama-2-7b", "--config.rl.kl_cof=0.1"],
     "config.rl.kl_cof: unknown config key in configs/gsm8k.py (closest known: rl.kl_coef"),
    (["--config=configs/gsm8k.py", "--model=llama-2-7b", "--config.rl.steps=many"], "config.rl.steps: 'many'"),
    (["--config=configs/nope.py", "--model=llama-2-7b"], "configs/nope.py not found"),
    (["--config=configs/gsm8k.py", "--model=llama-2-7b", "--device-memory=lots"], "--device-memory=lots"),
    (["--config=configs/gsm8k.py", "--model=llama-2-7b", "--tpu=v5p:2x2x1"], "--tpu=v5p:2x2x1: give --device-memory"),
    (["--config=configs/gsm8k.py", "--model=llama-2-7b", "--tpu=v5p:2x2x1", "--device-memory=95GB"],
     '--tpu=v5p:2x2x1: needs the TPU compiler: pip install "libtpu'),
])
def test_bad_input_is_one_line(args, named, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "libtpu" else real_find_spec(name, *rest))
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    assert plan.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and named in err[0], err


def test_a_bad_value_in_a_config_file_is_named_at_its_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    path = tmp_path / "exp.py"
    path.write_text("from configs.gsm8k import get_config as gsm8k\n\n\ndef get_config():\n    c = gsm8k()\n"
                    "    c.sft.batch_size = 5\n    return c\n")
    assert plan.main([f"--config={path}", "--model=qwen3-0.6b", "--devices=2"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"(set in {path}:6: c.sft.batch_size = 5)")
    assert plan.main([f"--config={path}", "--model=qwen3-0.6b", "--devices=2", "--set", "sft.batch_size=3"]) == 2
    assert "(set in" not in capsys.readouterr().err  # the override set it


def test_a_tpu_compile_refused_for_memory_is_read_as_its_bytes():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(20.83G) exceeds available HBM (15.75G).")
    assert plan.over_device_bytes(message) == int(20.83 * 2 ** 30)
    assert plan.over_device_bytes("INVALID_ARGUMENT: temporaries (20.83G)") is None
    assert plan.over_device_bytes("RESOURCE_EXHAUSTED: out of host memory") is None


def test_a_phase_refused_for_memory_enters_the_plan_at_its_bytes():
    """As a TPU compile for a chip too small (the planner's --tpu); any other error is raised."""
    from r3jax import sharding

    compile_phase = plan._Compiler(lambda _: None, {})
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])

    def failing(message):
        def lowered():
            raise jax.errors.JaxRuntimeError(message)
        return lowered

    assert compile_phase("sft_step", mesh, failing(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (20.83G) "
        "exceeds available HBM (15.75G).")) is None
    refused = compile_phase.phases["sft_step"]
    assert refused["peak_bytes"] == refused["temp_bytes"] == int(20.83 * 2 ** 30)
    assert refused["compile_error"].startswith("RESOURCE_EXHAUSTED")
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        compile_phase("ppo_update", mesh, failing("INTERNAL: something else"))


def test_main_and_planner_read_an_override_alike(monkeypatch):
    """`--config.KEY=VALUE` means the same to python -m r3jax.main (absl's config flags) and to
    the planner (config.apply_override)."""
    from r3jax import main

    overrides = ["--config.mesh=(1,-1,1)", "--config.rl.lr=3e-5", "--config.rl.strategy=staged",
                 "--config.model.scan_layers=True", "--config.compare.arms=('r3','rl-grpo')"]
    planned = plan.load_config(f"{ROOT}/configs/arith.py", [arg[len("--config."):] for arg in overrides])
    argv = ["r3jax", f"--config={ROOT}/configs/arith.py", *overrides]
    monkeypatch.setattr(sys, "argv", argv)  # absl's config flags register their overrides from sys.argv
    parsed = main.parse(argv)
    assert planned.to_dict() == parsed.to_dict() and planned.rl.strategy == "staged"


def test_presets_are_the_published_shapes():
    from r3jax.models import hf

    cfg = hf.config_from_hf(plan.PRESETS["llama-2-7b"], source="preset")
    assert cfg.num_params() == 6_738_415_616  # Llama-2-7B's parameter count
    assert abs(hf.config_from_hf(plan.PRESETS["qwen2.5-1.5b"], source="preset").num_params() - 1.54e9) < 0.02e9
    # Qwen3's model cards: total and non-embedding parameters, in billions
    for name, (total, body) in {"qwen3-0.6b": (0.6, 0.44), "qwen3-1.7b": (1.7, 1.4), "qwen3-4b": (4.0, 3.6),
                                "qwen3-8b": (8.2, 6.95)}.items():
        cfg = hf.config_from_hf(plan.PRESETS[name], source="preset")
        embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
        assert cfg.qk_norm and round(cfg.num_params() / 1e9, 1) == total, name
        assert abs((cfg.num_params() - embeddings) / 1e9 - body) < 0.05, name  # the cards round


def test_a_hub_id_is_planned_from_the_local_hugging_face_cache(tmp_path, monkeypatch):
    import json

    import huggingface_hub.constants

    from r3jax import config as config_lib

    repo = tmp_path / "models--Qwen--Qwen3-1.7B"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(plan.PRESETS["qwen3-1.7b"]))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    config = config_lib.base_config()
    config.model.path = "Qwen/Qwen3-1.7B"
    assert round(plan.model_config_for(config, None).num_params() / 1e9, 1) == 1.7
    config.model.path = "Qwen/Qwen3-4B"
    with pytest.raises(plan.PlanError, match="config.model.path: Qwen/Qwen3-4B has no config.json"):
        plan.model_config_for(config, None)


@pytest.mark.slow
def test_llama_2_7b_gsm8k_recipe_fits_8x80gb(tmp_path, monkeypatch):
    """The paper's recipe at Llama-2-7B shape on 8 x 80 GB (about a minute on 8 simulated devices;
    recorded in bench/results/plan-llama-2-7b-8x80GB.json)."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "plan.json"
    assert plan.main(["--config=configs/paper.py:gsm8k", "--model=llama-2-7b", "--devices=8",
                      "--device-memory=80GB", f"--out={out}"]) == 0
    result = __import__("json").load(open(out))
    assert result["fits"] and result["peak_bytes_per_device"] <= 72e9
    assert result["decode_collective_bytes"]["rollout"] <= 0.01 * result["weight_bytes"]
    assert result["decode_collective_bytes"]["training"] >= 0.5 * result["weight_bytes"]


def _fake_plan(resident_gb, sft_gb, update_gb, sampling_gb):
    """A stand-in for plan.plan whose peaks (GB, functions of the config) are the test's."""
    def fake(config, model_cfg, progress, rollout_tokens, devices):
        gb = lambda f: int(f(config) * plan.GB)  # noqa: E731
        return {"phases": {"sft_step": {"peak_bytes": gb(sft_gb)}, "ppo_update": {"peak_bytes": gb(update_gb)}},
                "sampling_peak_bytes_per_device": gb(sampling_gb), "peak_bytes_per_device": gb(
                    lambda c: max(sft_gb(c), update_gb(c), sampling_gb(c))),
                "param_bytes_per_device": gb(resident_gb), "frozen_bytes_per_device": 0,
                "optimizer_state_bytes_per_device": 0}
    return fake


def _search(monkeypatch, memory_gb, **peaks):
    monkeypatch.setattr(plan, "plan", _fake_plan(**peaks))
    config = plan.load_config(os.path.join(ROOT, "configs", "gsm8k.py"), [])
    result = plan.plan_until_it_fits(config, plan.model_config_for(config, "llama-2-7b"), memory_gb * plan.GB)
    return config, result


def test_knob_search_turns_only_the_knobs_of_the_phases_over_the_memory(monkeypatch):
    """Only the SFT step is over 24 GB (its peak halves with its microbatch): SFT's knobs are turned
    (attention blocks, then gradient accumulation), the update's and the sampler's are not."""
    config, result = _search(monkeypatch, 24, resident_gb=lambda c: 5, sft_gb=lambda c: 40 * c.sft.batch_size / 64,
                             update_gb=lambda c: 10, sampling_gb=lambda c: 10)
    assert result["fits"] and result["knobs_applied"] == ["model.attention_chunk=256", "sft.grad_accum=2"]
    assert (config.sft.batch_size, config.sft.grad_accum, config.rl.minibatches,
            config.rl.rollout_rows) == (32, 2, 1, 0)
    assert result["overrides"] == {"model.attention_chunk": 256, "sft.batch_size": 32, "sft.grad_accum": 2}


def test_knob_search_takes_each_phases_knobs_in_turn_and_lora_first_for_resident_weights(monkeypatch):
    """Weights and moments over the memory: LoRA first. Then the update and the sampler are both
    over, and a round turns one knob of each phase still over."""
    config, result = _search(monkeypatch, 24, resident_gb=lambda c: 30 if c.model.lora.rank == 0 else 4,
                             sft_gb=lambda c: 10, update_gb=lambda c: 90 / (c.rl.minibatches * c.rl.prepare_chunks),
                             sampling_gb=lambda c: 40 * (c.rl.rollout_rows or 64) / 64)
    assert result["fits"]
    # round 2 turns one knob of each phase over: attention blocks for the update, rows for the
    # sampler (then 20 GB, under 21.6); the update's row knobs alternate until it is under too
    assert result["knobs_applied"] == ["model.lora.rank=64", "model.attention_chunk=256", "rl.rollout_rows=32",
                                       "rl.minibatches=2, rl.pack=False", "rl.prepare_chunks=2", "rl.minibatches=4"]
    assert result["overrides"] == {"model.lora.rank": 64, "model.lora.base_dtype": "bfloat16",
                                   "model.attention_chunk": 256, "rl.rollout_rows": 32, "rl.minibatches": 4,
                                   "rl.pack": False, "rl.prepare_chunks": 2}


def test_knob_search_stops_when_no_knob_is_left(monkeypatch):
    config, result = _search(monkeypatch, 24, resident_gb=lambda c: 5, sft_gb=lambda c: 100,
                             update_gb=lambda c: 10, sampling_gb=lambda c: 10)
    assert not result["fits"] and result["knobs_applied"][-1] == "sft.grad_accum=64"
    assert len(result["knobs_applied"]) == 7 and config.sft.batch_size == 1


def test_a_bfloat16_plan_holds_no_float32_copy_of_the_weights(monkeypatch):
    """XLA:CPU computes bfloat16 dots in float32 and, left to itself, hoists the converts of the
    stacked weights out of the layer scan: a float32 copy of every weight in a decode step's
    temporaries, which no GPU or TPU makes. The plan compiles without that hoisting."""
    config = _tiny_config()
    config.model.update(hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, num_kv_heads=4,
                        head_dim=64, dtype="bfloat16", param_dtype="bfloat16", remat="none")
    config.mesh, config.rl.rollout_mesh = (1, 1, 1), None
    config.sft.update(batch_size=1, max_length=16)
    config.rl.update(batch_size=2, rollout_rows=2, max_new_tokens=8, max_prompt_length=8, pack=False)
    model_cfg = plan.model_config_for(config, None)
    layer_weights_float32 = config.model.num_layers * (4 * 256 * 256 + 3 * 256 * 1024) * 4
    devices = jax.devices()[:1]
    result = plan.plan_until_it_fits(config, model_cfg, 16 * 2 ** 30, devices=devices)
    assert result["compiler_options"] == plan.CPU_BFLOAT16_OPTIONS
    assert any("without the float32 copies" in line for line in plan.report_lines(result, 16 * 2 ** 30))
    assert result["phases"]["decode_step_training"]["temp_bytes"] < 0.5 * layer_weights_float32
    monkeypatch.setattr(plan, "CPU_BFLOAT16_OPTIONS", {})  # XLA:CPU's own passes
    hoisting = plan.plan(config, model_cfg, progress=lambda _: None, devices=devices)
    assert hoisting["phases"]["decode_step_training"]["temp_bytes"] > layer_weights_float32
    assert hoisting["phases"]["ppo_update"]["temp_bytes"] > result["phases"]["ppo_update"]["temp_bytes"]


def test_plans_of_float32_weights_compile_with_xlas_own_passes():
    """Float32 master weights computing in bfloat16 keep XLA's own passes, the larger count; so
    does an int8 or nf4 base."""
    import dataclasses

    from helpers import TINY
    from r3jax import sharding

    cpu = sharding.make_mesh((1, 1, 1), jax.devices()[:1])

    def options(**dtypes):
        return plan.compiler_options(dataclasses.replace(TINY, **dtypes), cpu)

    assert options(param_dtype="bfloat16", dtype="bfloat16") == plan.CPU_BFLOAT16_OPTIONS
    assert options(param_dtype="float32", dtype="bfloat16") == options(param_dtype="float32", dtype="float32") == {}
    assert options(param_dtype="bfloat16", dtype="bfloat16", quantized_kernels="nf4") == {}
