"""Model parity with HF transformers, KV-cache decoding, export, and sharded training steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from helpers import make_hf_model
from r3jax import models, programs, sharding
from r3jax.models import hf
from r3jax.models.transformer import Transformer, init_cache, positions_from_mask

FAMILIES = {
    "llama": {},
    "llama3": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32}},
    "mistral": {},
    "qwen2": {"tie_word_embeddings": True},
    # head_dim apart from hidden / heads, as in Qwen3-0.6B (1024 wide, 16 heads of 128)
    "qwen3": {"tie_word_embeddings": True, "head_dim": 24},
}


def _hf_kind(family):
    return "llama" if family.startswith("llama") else family


def _random_batch(rng, batch, seq, vocab, pad_counts):
    tokens = rng.integers(1, vocab, size=(batch, seq))
    mask = np.ones((batch, seq), np.int32)
    for row, pad in enumerate(pad_counts):
        mask[row, :pad] = 0
        tokens[row, :pad] = 0
    return tokens, mask


def _hf_logits(model, tokens, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    model = make_hf_model(_hf_kind(request.param), path, **FAMILIES[request.param])
    cfg, params = hf.load(path)
    return request.param, path, model, cfg, params


@pytest.mark.parametrize("pad_counts", [(0, 0, 0), (0, 3, 7)])
def test_logits_match_transformers(checkpoint, pad_counts):
    family, _, model, cfg, params = checkpoint
    tokens, mask = _random_batch(np.random.default_rng(1), 3, 12, cfg.vocab_size, pad_counts)
    ours = np.asarray(models.logits(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
    theirs = _hf_logits(model, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)
    if family == "qwen2":
        assert cfg.attention_bias and cfg.tie_word_embeddings and "lm_head" not in params
    if family == "qwen3":
        assert cfg.qk_norm and not cfg.attention_bias and cfg.head_dim == 24 and "lm_head" not in params
        assert params["layers_0"]["attn"]["k_norm"]["scale"].shape == (24,)
        assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    if family == "llama3":
        assert cfg.rope_scaling is not None


def test_kv_cache_decoding_matches_full_forward(checkpoint):
    _, _, _, cfg, params = checkpoint
    tokens, mask = _random_batch(np.random.default_rng(2), 2, 10, cfg.vocab_size, (0, 4))
    prompt_len = 6
    model = Transformer(cfg)
    cache = init_cache(cfg, 2, tokens.shape[1])
    positions = positions_from_mask(jnp.asarray(mask))
    _, _, cache = model.apply({"params": params}, tokens[:, :prompt_len], positions[:, :prompt_len],
                              jnp.asarray(mask), cache, 0)
    for t in range(prompt_len, tokens.shape[1]):
        step_logits, _, cache = model.apply({"params": params}, tokens[:, t:t + 1], positions[:, t:t + 1],
                                            jnp.asarray(mask), cache, t)
    full = models.logits(cfg, params, jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(step_logits[:, 0]), np.asarray(full[:, -1]), atol=1e-4, rtol=0)


def test_save_roundtrip_through_transformers(checkpoint, tmp_path):
    _, _, _, cfg, params = checkpoint
    hf.save(str(tmp_path), cfg, params, max_shard_bytes=20_000)  # forces several shards + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens, mask = _random_batch(np.random.default_rng(3), 2, 9, cfg.vocab_size, (0, 2))
    ours = np.asarray(models.logits(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens, mask)[real], ours[real], atol=1e-4, rtol=0)


def test_load_errors_name_the_problem(tmp_path):
    make_hf_model("llama", str(tmp_path))
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace('"llama"', '"gpt2"'))
    with pytest.raises(hf.CheckpointError, match="gpt2"):
        hf.load(str(tmp_path))
    (tmp_path / "config.json").write_text(config.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(hf.CheckpointError, match="model.layers.2"):
        hf.load(str(tmp_path))


def test_sharded_train_step_matches_single_device(tmp_path):
    make_hf_model("llama", str(tmp_path), num_attention_heads=4, num_key_value_heads=2)
    mesh = sharding.make_mesh((2, 2, 2))
    cfg, params = hf.load(str(tmp_path))
    _, sharded = hf.load(str(tmp_path), mesh=mesh)
    q_kernel = sharded["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert len({str(s.index) for s in q_kernel.addressable_shards}) == 4  # really split 4 ways

    tokens, mask = _random_batch(np.random.default_rng(4), 8, 12, cfg.vocab_size, [0, 1, 2, 3] * 2)

    def loss_fn(p, tokens, mask):
        logits = models.logits(cfg, p, tokens, mask)
        logp = jax.nn.log_softmax(logits[:, :-1])
        target = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        return -(target * mask[:, 1:]).sum() / mask[:, 1:].sum()

    step = jax.jit(jax.value_and_grad(loss_fn))
    loss_1, grads_1 = step(params, jnp.asarray(tokens), jnp.asarray(mask))
    batch = sharding.shard_batch((tokens, mask), mesh)
    sharded_step = jax.jit(jax.value_and_grad(loss_fn))
    with programs.on_mesh(mesh):  # traced as the trainers trace: rows kept split, the embedding read whole
        assert "sharding_constraint" in sharded_step.lower(sharded, *batch).as_text()
        loss_8, grads_8 = sharded_step(sharded, *batch)
    np.testing.assert_allclose(float(loss_8), float(loss_1), atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                 grads_8, grads_1)
