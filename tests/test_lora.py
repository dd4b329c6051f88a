"""LoRA: fresh adapters change nothing, only adapters train (the base stays bit-identical and has no
optimizer state), scanned/remat and sharded models agree with the plain one, and the exports (folded
HF checkpoint, PEFT adapter) load in transformers and peft with r3jax's outputs."""
import functools
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, make_hf_model, tiny_params
from r3jax import config as config_lib, optim, ppo, sharding
from r3jax.errors import ConfigError, InputError
from r3jax.models import hf, lora
from r3jax.models.transformer import NF4_LEVELS, forward, init_params, pack_nf4, unpack_nf4
from r3jax.models.value import actor_critic_params
from r3jax.rollout import Policy
from r3jax.sampling import SamplingConfig, sample
from r3jax.train import sft

LORA = TINY.replace(lora_rank=4, lora_alpha=8.0, lora_targets=config_lib.LORA_MODULES)
TOKENS = jnp.asarray([[0, 0, 5, 9, 14, 3, 7, 22], [4, 8, 15, 16, 23, 42, 11, 2]]) % TINY.vocab_size
MASK = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])


def _is_b(path) -> bool:
    return path[-1].key == "b"


def _trained_adapters(params, seed=1):
    """`params` with every adapter's B random (as after training), so adapters change the outputs."""
    adapters, base = lora.split(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.1 * jax.random.normal(next(keys), x.shape) if _is_b(path) else x, adapters)
    return lora.merge(base, adapters)


def test_fresh_adapters_leave_the_logits_exactly_the_base_ones():
    params = tiny_params(LORA)
    adapters, base = lora.split(params)
    assert set(adapters["layers_0"]["attn"]) == {"q_proj_lora", "k_proj_lora", "v_proj_lora", "o_proj_lora"}
    assert not any(k.endswith("_lora") for k in base["layers_0"]["attn"])
    with_adapters = forward(LORA, params, TOKENS, MASK)[0]
    np.testing.assert_array_equal(with_adapters, forward(TINY, base, TOKENS, MASK)[0])
    np.testing.assert_array_equal(with_adapters, forward(TINY, tiny_params(TINY), TOKENS, MASK)[0])  # same base init


def test_folded_adapters_give_the_lora_models_logits():
    params = _trained_adapters(tiny_params(LORA))
    lora_logits = forward(LORA, params, TOKENS, MASK)[0]
    folded = lora.fold(LORA, params)
    assert jax.tree.structure(folded) == jax.tree.structure(lora.split(params)[1])
    assert float(jnp.abs(lora_logits - forward(TINY, lora.split(params)[1], TOKENS, MASK)[0]).max()) > 1e-3
    np.testing.assert_allclose(forward(TINY, folded, TOKENS, MASK)[0], lora_logits, atol=2e-5)


def _loss(cfg, adapters, base):
    logits = forward(cfg, lora.merge(base, adapters), TOKENS, MASK)[0]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3])


def _stack_layers(tree, cfg):
    layers = [tree[f"layers_{i}"] for i in range(cfg.num_layers)]
    rest = {k: v for k, v in tree.items() if not k.startswith("layers_")}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)} if layers else rest


def test_scanned_and_rematerialised_lora_equals_unrolled_in_logits_and_gradients():
    params = _trained_adapters(tiny_params(LORA))
    adapters, base = lora.split(params)
    scanned = LORA.replace(scan_layers=True, remat="full")
    stacked_adapters, stacked_base = _stack_layers(adapters, LORA), _stack_layers(base, LORA)
    np.testing.assert_allclose(forward(scanned, lora.merge(stacked_base, stacked_adapters), TOKENS, MASK)[0],
                               forward(LORA, params, TOKENS, MASK)[0], atol=1e-5)
    unrolled_grads = jax.grad(_loss, argnums=1)(LORA, adapters, base)
    scanned_grads = jax.grad(_loss, argnums=1)(scanned, stacked_adapters, stacked_base)
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=1e-4),
                 scanned_grads, _stack_layers(unrolled_grads, LORA))
    np.testing.assert_allclose(forward(scanned.base(), lora.fold(scanned, lora.merge(stacked_base, stacked_adapters)),
                                       TOKENS, MASK)[0], forward(LORA, params, TOKENS, MASK)[0], atol=2e-5)


def test_sharded_lora_equals_one_device():
    mesh = sharding.make_mesh((1, 4, 2))
    params = _trained_adapters(tiny_params(LORA))
    shardings = sharding.logical_shardings(jax.eval_shape(functools.partial(init_params, LORA), jax.random.key(0)), mesh)
    placed = jax.device_put(params, shardings)
    adapter_specs = [leaf.sharding.spec for leaf in jax.tree.leaves(lora.split(placed)[0])]
    assert all(spec[-1] is None for spec in adapter_specs[::2])  # each A's rank axis is replicated
    adapters, base = lora.split(placed)
    sharded = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(LORA, adapters, base)
    single = jax.value_and_grad(_loss, argnums=1)(LORA, *lora.split(params))
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=1e-5), sharded, single)



def test_an_nf4_base_quantized_on_the_mesh_equals_one_device():
    """quantize_placed makes each packed code and scale shard on its device (the packed input axis
    keeps its logical name); loss and adapter gradients equal one device's."""
    nf4 = LORA.replace(quantized_kernels="nf4")
    adapters, base = lora.split(_trained_adapters(tiny_params(LORA)))
    mesh = sharding.make_mesh((1, 4, 2))
    placed = lora.quantize_placed(nf4, base, mesh)
    assert placed["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec[0] == "fsdp"
    sharded = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(nf4, adapters, placed)
    single = jax.value_and_grad(_loss, argnums=1)(nf4, adapters, lora.quantize(nf4, base))
    jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=1e-5), sharded, single)

def _sft_batch():
    return {"tokens": TOKENS[:, None], "attention_mask": MASK[:, None],
            "loss_mask": jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]])[:, None]}


def test_lora_sft_trains_only_the_adapters():
    params = tiny_params(LORA)
    adapters, base = lora.split(params)
    base_before = jax.tree.map(np.array, base)
    optimizer = optim.adamw(1e-2)
    state = sft.SFTState(adapters, jax.jit(optimizer.init)(adapters), jnp.zeros((), jnp.int32))
    assert {leaf.size for leaf in jax.tree.leaves(state.opt_state)} - {1} <= {leaf.size for leaf in jax.tree.leaves(adapters)}
    step = sft.make_train_step(LORA, optimizer)
    for _ in range(2):
        state, metrics = step(state, _sft_batch(), 1.0, base)
    jax.tree.map(np.testing.assert_array_equal, base, base_before)
    moved = jax.tree_util.tree_map_with_path(lambda path, new, old: not _is_b(path) or not np.array_equal(new, old),
                                             state.params, adapters)
    assert all(jax.tree.leaves(moved))  # every B moved off zero
    full_loss = sft.nll_sum(TINY, lora.fold(LORA, lora.merge(base, state.params)), jax.tree.map(lambda x: x[:, 0], _sft_batch()))
    next_state, next_metrics = step(state, _sft_batch(), 0.0, base)
    np.testing.assert_allclose(next_metrics["loss"], full_loss[0] / full_loss[1], rtol=1e-5)


@pytest.mark.parametrize("separate_critic", [False, True])
def test_lora_ppo_update_trains_adapters_and_critic_against_the_base_as_reference(separate_critic):
    params = _trained_adapters(tiny_params(LORA, scale=3.0))
    adapters, base = lora.split(params)
    base_before = jax.tree.map(np.array, base)
    actor_critic = actor_critic_params(LORA, adapters, separate_critic)
    assert actor_critic.critic_backbone is None or jax.tree.structure(actor_critic.critic_backbone) == jax.tree.structure(adapters)
    cfg = ppo.PPOConfig(kl_coef=0.1, epochs=2)
    optimizer = optim.actor_critic(optim.adamw(1e-2), optim.adamw(1e-2), actor_critic)
    state = ppo.init_state(actor_critic, optimizer)
    rollout = sample(LORA, params, TOKENS, MASK, jax.random.key(0), SamplingConfig(max_new_tokens=6, pad_id=0))
    data = ppo.experience(rollout, jnp.asarray([1.0, 0.0]))
    prepared, metrics, _ = ppo.prepare(LORA, cfg, actor_critic, None, data, base)
    base_hidden = forward(TINY, base, rollout.tokens, rollout.attention_mask, with_head=False)[1]
    base_logp, _ = ppo.chunked_logprobs(TINY, base, base_hidden[:, -7:-1], rollout.tokens[:, -6:], 1.0)
    np.testing.assert_allclose(prepared.ref_logprobs, base_logp, atol=1e-6)  # the reference: adapters off
    np.testing.assert_allclose(prepared.old_logprobs * rollout.completion_mask, rollout.logprobs, atol=1e-5)
    update = ppo.make_ppo_update(LORA, cfg, optimizer)
    new_state, metrics, _ = update(state, None, data, jax.random.key(1), 1.0, 1.0, base)
    jax.tree.map(np.testing.assert_array_equal, base, base_before)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["kl"]) > 0
    for before, after in ((actor_critic.value_head, new_state.params.value_head), (adapters, new_state.params.policy)):
        assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_exports_fold_adapters_and_write_a_peft_adapter_that_peft_loads(tok, tmp_path):
    """The merged export generates in transformers exactly as r3jax with adapters, and the PEFT
    adapter on the HF base gives r3jax's logits."""
    import peft
    import torch
    import transformers

    cfg = LORA.replace(vocab_size=tok.vocab_size)
    params = _trained_adapters(tiny_params(cfg, scale=4.0))
    base_dir, export_dir = str(tmp_path / "base"), str(tmp_path / "export")
    sft.export(base_dir, Policy(cfg.base(), lora.split(params)[1], tok, None))
    previous = os.umask(0o022)
    try:
        sft.export(export_dir, Policy(cfg, params, tok, None), base_model=base_dir)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(f"{export_dir}/adapter/adapter_model.safetensors").st_mode) == 0o644  # safetensors': 0600

    prompt = tok.encode("Mia has 3 pens.", add_bos=True)
    rollout = sample(cfg, params, jnp.asarray([prompt]), jnp.ones((1, len(prompt)), jnp.int32), jax.random.key(0),
                     SamplingConfig(max_new_tokens=10, greedy=True, stop_ids=tok.stop_ids, pad_id=tok.pad_id))
    ours = [int(t) for t, m in zip(rollout.completions[0], rollout.completion_mask[0]) if m]
    merged = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    assert merged.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist() == ours

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, f"{export_dir}/adapter").eval()
    with torch.no_grad():
        theirs = adapted(torch.tensor([prompt])).logits.numpy()
    ours_logits = forward(cfg, params, jnp.asarray([prompt]), jnp.ones((1, len(prompt)), jnp.int32))[0]
    assert float(np.abs(ours_logits - forward(cfg.base(), lora.split(params)[1], jnp.asarray([prompt]),
                                              jnp.ones((1, len(prompt)), jnp.int32))[0]).max()) > 1e-2
    np.testing.assert_allclose(theirs, ours_logits, atol=1e-4)


@pytest.mark.parametrize("key, value, message", [
    ("rank", -1, "config.model.lora.rank: must be a positive rank"),
    ("targets", "lm_head", "config.model.lora.targets: 'lm_head' matches no module (the modules: q_proj, k_proj"),
    ("targets", "(q_proj", "config.model.lora.targets: '(q_proj' is not a regular expression"),
    ("base_dtype", "nf5", "config.model.lora.base_dtype: 'nf5' is not one of"),
    ("init_from", "/no/adapter", "config.model.lora.init_from: /no/adapter has no adapter_config.json"),
])
def test_bad_lora_settings_are_refused_naming_the_key(key, value, message):
    config = config_lib.base_config()
    config.model.lora.rank = 8
    config.model.lora[key] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_lib.validate(config, 1)


def _peft_adapter(tmp_path, targets=("q_proj", "o_proj", "down_proj"), rank=4, **hf_shape):
    """A tiny HF Llama and a random (B not zero) adapter that peft made for it: (base dir, adapter dir, peft model)."""
    import peft
    import torch

    base = make_hf_model("llama", str(tmp_path / "base"), **hf_shape)
    torch.manual_seed(1)
    adapted = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=8, target_modules=list(targets),
                                                        init_lora_weights=False)).eval()
    adapted.save_pretrained(str(tmp_path / "adapter"))
    return str(tmp_path / "base"), str(tmp_path / "adapter"), adapted


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_an_adapter_peft_made_continues_with_pefts_logits(tmp_path, scan_layers):
    """model.lora.init_from's reader: peft's own adapter on its HF base gives peft's logits in r3jax,
    and written back out it is the same adapter."""
    import torch
    from safetensors.numpy import load_file

    base_dir, adapter_dir, adapted = _peft_adapter(tmp_path)
    cfg, base = hf.load(base_dir, scan_layers=scan_layers)
    cfg = cfg.replace(lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "o_proj", "down_proj"))
    params = lora.merge(base, lora.load_peft(adapter_dir, cfg, sharding.make_mesh((1, 1, 1), jax.devices()[:1])))
    tokens = np.asarray([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        theirs = adapted(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(forward(cfg, params, jnp.asarray(tokens), jnp.ones_like(tokens))[0], theirs, atol=1e-4)
    written = lora.peft_tensors(cfg, params)
    saved = load_file(f"{adapter_dir}/adapter_model.safetensors")
    assert set(written) == set(saved)
    for name, tensor in written.items():
        np.testing.assert_array_equal(tensor, saved[name])


def test_an_adapter_of_another_shape_or_rank_is_refused_naming_it(tmp_path):
    base_dir, adapter_dir, _ = _peft_adapter(tmp_path, hidden_size=32, intermediate_size=48)
    cfg = TINY.replace(lora_rank=4, lora_targets=("q_proj", "o_proj", "down_proj"))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with pytest.raises(InputError, match=r"config.model.lora.init_from: .*: tensor base_model\.model\.model\.layers\.0\."
                                         r"self_attn\.o_proj\.lora_B\.weight has shape \(32, 4\), this model's "
                                         r"adapter there has \(48, 4\)"):
        lora.load_peft(adapter_dir, cfg.replace(hidden_size=48), mesh)
    with pytest.raises(InputError, match=r"holds rank 4 adapters on .*; the config asks for rank 8"):
        lora.load_peft(adapter_dir, cfg.replace(lora_rank=8), mesh)
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)  # before: safetensors' traceback
    with pytest.raises(InputError, match=f"^{weights} cannot be read \\(.+\\), perhaps cut short by a crash: "
                                         "give config.model.lora.init_from a whole PEFT adapter directory$"):
        lora.load_peft(adapter_dir, cfg.replace(hidden_size=32, intermediate_size=48), mesh)


def test_an_int8_base_is_its_float_base_to_half_a_scale_step_and_stays_frozen():
    """model.lora.base_dtype=int8: each projection kernel as int8 codes times a float32 scale per
    output feature, every weight within half a scale step of the float one (the rounding's bound);
    logits close to the float model's: a weight's rounding error is up to 1/254 of its output
    feature's largest weight, about 0.7% of a projection's output spread for these 32-64-wide
    layers, compounded over two layers of seven projections, so the mean error is asserted below 2%
    and the largest below 10% of the logits' spread (measured: 0.5% and 4%); an SFT step leaves codes
    and scales bit-identical, and the folded export is the dequantized base plus the adapters."""
    params = _trained_adapters(tiny_params(LORA))
    adapters, base = lora.split(params)
    int8 = LORA.replace(quantized_kernels="int8")
    quantized = lora.quantize(int8, base)
    q_proj = quantized["layers_0"]["attn"]["q_proj"]
    assert q_proj["kernel"].dtype == jnp.int8 and q_proj["kernel_scale"].shape == (TINY.num_heads, TINY.head_dim)
    original = base["layers_0"]["attn"]["q_proj"]["kernel"]
    error = jnp.abs(lora.dequantized_kernel(int8, "q_proj", q_proj) - original)
    assert bool((error <= q_proj["kernel_scale"][None] / 2 + 1e-7).all())
    float_logits = forward(LORA, params, TOKENS, MASK)[0]
    int8_logits = forward(int8, lora.merge(quantized, adapters), TOKENS, MASK)[0]
    errors, spread = jnp.abs(int8_logits - float_logits), float(float_logits.std())
    assert 0 < float(errors.mean()) < 0.02 * spread and float(errors.max()) < 0.1 * spread
    optimizer = optim.adamw(1e-2)
    state = sft.SFTState(adapters, optimizer.init(adapters), jnp.zeros((), jnp.int32))
    state, _ = sft.make_train_step(int8, optimizer)(state, _sft_batch(), 1.0, quantized)
    jax.tree.map(np.testing.assert_array_equal, quantized, lora.quantize(int8, base))
    folded = lora.fold(int8, lora.merge(quantized, state.params))
    assert folded["layers_0"]["attn"]["q_proj"].keys() == {"kernel"}
    np.testing.assert_allclose(forward(TINY, folded, TOKENS, MASK)[0],
                               forward(int8, lora.merge(quantized, state.params), TOKENS, MASK)[0], atol=1e-4)


@pytest.mark.parametrize("lead", [0, 1])
def test_nf4_codes_pack_two_per_byte_and_unpack_exactly(lead):
    """Codes 2i and 2i + 1 of the first input axis (after `lead` stacked axes) share byte i, low half
    first; unpacking gives the codes back; an odd axis is refused naming the alternative."""
    shape = (6, 5) if lead == 0 else (3, 6, 5)
    codes = np.asarray(jax.random.randint(jax.random.key(0), shape, 0, 16))
    packed = np.asarray(pack_nf4(jnp.asarray(codes), lead))
    assert packed.dtype == np.uint8 and packed.shape[lead] == 3
    moved_codes, moved_packed = np.moveaxis(codes, lead, 0), np.moveaxis(packed, lead, 0)
    np.testing.assert_array_equal(moved_packed[1], moved_codes[2] | (moved_codes[3] << 4))
    np.testing.assert_array_equal(unpack_nf4(jnp.asarray(packed), lead), codes)
    with pytest.raises(ValueError, match="odd size 5.*base_dtype=int8"):
        pack_nf4(jnp.zeros((5, 4), jnp.int32), 0)
    odd_heads = config_lib.base_config().model.lora
    odd_heads.update(rank=4, base_dtype="nf4")
    with pytest.raises(ConfigError, match=r"^config.model.lora.base_dtype: .*'num_heads': 3.*use int8"):
        lora.configure(TINY.replace(num_heads=3, num_kv_heads=1), odd_heads)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_an_nf4_base_is_its_float_base_to_half_the_widest_level_gap_and_stays_frozen(scan_layers):
    """model.lora.base_dtype=nf4 (QLoRA): 4-bit codes (two per byte) of NormalFloat levels times a float32 scale per
    block of input weights of each output feature (32 here: these layers are 32 wide), each weight
    within half the widest gap between adjacent levels (0.139) of its block's largest magnitude;
    logits near the float model's: for Gaussian weights NF4's error is about 10% of a weight's
    spread (against int8's 0.2%), compounded over two layers of seven projections, so the mean
    error is asserted below 15% of the logits' spread and the largest below the spread (measured:
    7.8% and 37% unrolled, 8.6% and 60% scanned, whose random weights differ); an SFT step leaves
    codes and scales bit-identical, and the folded export is the dequantized base plus the adapters."""
    cfg = LORA.replace(scan_layers=scan_layers)
    params = _trained_adapters(tiny_params(cfg))
    adapters, base = lora.split(params)
    nf4 = cfg.replace(quantized_kernels="nf4")
    quantized = lora.quantize(nf4, base)
    layers = (lambda tree: tree["layers"]) if scan_layers else (lambda tree: tree["layers_0"])
    q_proj = layers(quantized)["attn"]["q_proj"]
    lead = (TINY.num_layers,) if scan_layers else ()
    assert q_proj["kernel"].dtype == jnp.uint8  # two codes per byte along the input axis
    assert q_proj["kernel"].shape == (*lead, TINY.hidden_size // 2, TINY.num_heads, TINY.head_dim)
    assert q_proj["kernel_scale"].shape == (*lead, 1, TINY.num_heads, TINY.head_dim)  # 32 inputs: one block
    original = layers(base)["attn"]["q_proj"]["kernel"]
    error = jnp.abs(lora.dequantized_kernel(nf4, "q_proj", q_proj) - original)
    widest_gap = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:]))
    assert bool((error <= widest_gap / 2 * q_proj["kernel_scale"] + 1e-7).all())
    float_logits = forward(cfg, params, TOKENS, MASK)[0]
    nf4_logits = forward(nf4, lora.merge(quantized, adapters), TOKENS, MASK)[0]
    errors, spread = jnp.abs(nf4_logits - float_logits), float(float_logits.std())
    assert 0 < float(errors.mean()) < 0.15 * spread and float(errors.max()) < spread
    optimizer = optim.adamw(1e-2)
    state = sft.SFTState(adapters, optimizer.init(adapters), jnp.zeros((), jnp.int32))
    state, _ = sft.make_train_step(nf4, optimizer)(state, _sft_batch(), 1.0, quantized)
    jax.tree.map(np.testing.assert_array_equal, quantized, lora.quantize(nf4, base))
    folded = lora.fold(nf4, lora.merge(quantized, state.params))
    np.testing.assert_allclose(forward(cfg.replace(lora_rank=0, lora_targets=()), folded, TOKENS, MASK)[0],
                               forward(nf4, lora.merge(quantized, state.params), TOKENS, MASK)[0], atol=1e-4)


def test_the_job_quantises_the_base_it_puts_adapters_on(tmp_path):
    """job.with_adapters with model.lora.base_dtype=int8 on an HF model loaded in bfloat16: int8
    projection kernels with their scales, bfloat16 for the rest, float32 adapters; and the
    planner's model shape for the same config is the one trained."""
    from r3jax import plan
    from r3jax.train import job

    make_hf_model("llama", str(tmp_path / "hf"))
    config = config_lib.base_config()
    config.model.path = str(tmp_path / "hf")
    config.model.lora.update(rank=4, base_dtype="int8")
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    policy = job.with_adapters(config, job.load_policy(config.model.path, config, None, mesh))
    layer = policy.params["layers_1"]
    assert layer["mlp"]["down_proj"]["kernel"].dtype == jnp.int8 and layer["mlp"]["down_proj_lora"]["a"].dtype == jnp.float32
    assert layer["input_norm"]["scale"].dtype == jnp.bfloat16 and policy.model_cfg.quantized_kernels == "int8"
    assert plan.model_config_for(config, None) == policy.model_cfg
    logits = forward(policy.model_cfg, policy.params, TOKENS, MASK)[0]
    assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("base_dtype, said", [("float32", "weights in float32, compute"),
                                              ("nf4", "weights in float32 (the frozen projections in nf4), compute")])
def test_the_start_up_line_says_what_the_base_is_stored_in(base_dtype, said, capsys):
    from r3jax.train import job

    config = config_lib.base_config()
    config.model.lora.update(rank=4, base_dtype=base_dtype)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    policy = job.with_adapters(config, Policy(TINY, tiny_params(TINY), None, mesh))
    job.announce(policy, "a test")
    lines = capsys.readouterr().out.splitlines()
    assert said in lines[0] and lines[1].startswith("LoRA rank 4 on ")
