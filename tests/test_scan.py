"""Scanned layers and rematerialisation compute what the unrolled model does: logits and
gradients (fp32), the HF round trip, and KV-cache decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from helpers import TINY, tiny_params
from r3jax.models import hf
from r3jax.models.transformer import Read, attention, causal_block_attention, forward, reads_in_last_layer
from r3jax.sampling import SamplingConfig, sample


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny model's unrolled params written as an HF checkpoint, and read back scanned."""
    path = str(tmp_path_factory.mktemp("unrolled"))
    params = tiny_params(TINY, scale=3.0)
    hf.save(path, TINY, params)
    return path, params


def _inputs():
    tokens = jax.random.randint(jax.random.key(0), (3, 12), 0, TINY.vocab_size)
    mask = jnp.ones_like(tokens).at[0, :4].set(0)  # one left-padded row
    return tokens, mask


def _loss(cfg, params, tokens, mask):
    logits, _ = forward(cfg, params, tokens, mask)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)


@pytest.mark.parametrize("scan, remat", [(False, "full"), (True, "none"), (True, "full"), (True, "save_dots")])
def test_scanned_and_remat_equal_unrolled_logits_and_gradients(checkpoint, scan, remat):
    path, params = checkpoint
    cfg, loaded = hf.load(path, scan_layers=scan, remat=remat)
    assert ("layers" in loaded) == scan
    if scan:
        assert loaded["layers"]["attn"]["q_proj"]["kernel"].shape[0] == TINY.num_layers
    tokens, mask = _inputs()
    want_logits, _ = forward(TINY, params, tokens, mask)
    got_logits, _ = forward(cfg, loaded, tokens, mask)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=1e-5, rtol=1e-5)
    want = jax.grad(lambda p: _loss(TINY, p, tokens, mask))(params)
    got = jax.grad(lambda p: _loss(cfg, p, tokens, mask))(loaded)
    if scan:  # compare layer by layer
        for i in range(TINY.num_layers):
            jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g[i]), np.asarray(w), atol=1e-5),
                         got["layers"], want[f"layers_{i}"])
        got = {k: v for k, v in got.items() if k != "layers"}
        want = {k: v for k, v in want.items() if not k.startswith("layers_")}
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5), got, want)


def test_scanned_round_trip_through_hf_and_decoding(checkpoint, tmp_path):
    path, params = checkpoint
    cfg, scanned = hf.load(path, scan_layers=True)
    hf.save(str(tmp_path), cfg, scanned)
    _, again = hf.load(str(tmp_path))  # unrolled
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, params)
    tokens, mask = _inputs()
    settings = SamplingConfig(max_new_tokens=8, greedy=True, pad_id=0)
    want = sample(TINY, params, tokens, mask, jax.random.key(1), settings)
    got = sample(cfg, scanned, tokens, mask, jax.random.key(1), settings)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)


def _decode_temp_bytes(cfg, rows: int, cache_len: int) -> int:
    """XLA's temporaries for one compiled decode step with the cache donated, from shapes alone."""
    import functools

    from r3jax.models.transformer import init_cache, init_params
    from r3jax.sampling import decode_step
    params = jax.eval_shape(lambda: nn.unbox(init_params(cfg, jax.random.key(0))))
    cache = jax.eval_shape(lambda: init_cache(cfg, rows, cache_len))
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    compiled = jax.jit(functools.partial(decode_step, cfg), donate_argnums=4).lower(
        params, ints(rows), ints(rows), ints(rows, cache_len), cache, ints()).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_scanned_decode_step_updates_the_cache_in_place():
    """The stacked cache rides in the scan's carry: a decode step's temporaries grow per layer by
    less than half a layer's cache (here by nothing), as the unrolled model's do. As the scan's
    outputs they grew by a whole layer's cache per layer here, 2.5-3x at the GSM8K recipe's shape:
    a copy of the whole cache every token."""
    rows, cache_len = 8, 2048
    layer_cache_bytes = 2 * rows * TINY.num_kv_heads * cache_len * TINY.head_dim * 4
    for scan in (False, True):
        small, large = (_decode_temp_bytes(TINY.replace(num_layers=n, scan_layers=scan, decode_block=0), rows,
                                           cache_len) for n in (2, 6))
        assert (large - small) / 4 < layer_cache_bytes / 2, (scan, small, large, layer_cache_bytes)


@pytest.mark.parametrize("scan, chunk", [(False, 4), (True, 5)])
def test_chunked_attention_equals_whole_logits_gradients_packed_and_decoding(checkpoint, scan, chunk):
    """model.attention_chunk attends a few queries at a time (5 leaves a padded last block of 12):
    the same logits and gradients, on left-padded and on packed rows, and the same greedy decoding
    from a chunked prefill."""
    path, params = checkpoint
    cfg, loaded = hf.load(path, scan_layers=scan)
    chunked = cfg.replace(attention_chunk=chunk)
    tokens, mask = _inputs()
    segments = jnp.array([[1] * 5 + [2] * 7, [1] * 12, [1] * 3 + [2] * 6 + [0] * 3])
    positions = jnp.where(segments > 0, jnp.arange(12) - jnp.array([[0] * 5 + [5] * 7, [0] * 12, [0] * 3 + [3] * 9]), 0)
    for batch_mask, batch_positions in ((mask, None), (segments, positions)):
        want, _ = forward(cfg, loaded, tokens, batch_mask, positions=batch_positions)
        got, _ = forward(chunked, loaded, tokens, batch_mask, positions=batch_positions)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    want = jax.grad(lambda p: _loss(cfg, p, tokens, mask))(loaded)
    got = jax.grad(lambda p: _loss(chunked, p, tokens, mask))(loaded)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5), got, want)
    settings = SamplingConfig(max_new_tokens=8, greedy=True, pad_id=0)
    want = sample(cfg, loaded, tokens, mask, jax.random.key(1), settings)
    got = sample(chunked, loaded, tokens, mask, jax.random.key(1), settings)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)


@pytest.mark.parametrize("scan, remat, chunk", [(False, "none", 0), (False, "full", 0), (True, "none", 0),
                                               (False, "none", 4)])
def test_a_forward_read_at_a_few_positions_equals_the_whole_forward_there(checkpoint, scan, remat, chunk):
    """A `Read` (the states that predict completion tokens): the same logits, hidden states and
    gradients as the whole forward taken at those positions, on left-padded rows (the last 5 slots
    of each), on packed ones read row by row (5 slots of one segment per row), and across packed
    rows (two read sequences in row 0, one in each other row, row 1's read twice). Read row by row,
    the unrolled dense forward computes its last layer there alone; the others read after."""
    path, _ = checkpoint
    cfg, params = hf.load(path, scan_layers=scan, remat=remat)
    cfg = cfg.replace(attention_chunk=chunk)
    assert reads_in_last_layer(cfg) == (not scan and not chunk)
    tokens, mask = _inputs()
    segments = jnp.array([[1] * 5 + [2] * 7, [1] * 12, [1] * 3 + [2] * 6 + [0] * 3])
    positions = jnp.where(segments > 0, jnp.arange(12) - jnp.array([[0] * 5 + [5] * 7, [0] * 12, [0] * 3 + [3] * 9]), 0)
    padded_read = Read(jnp.broadcast_to(jnp.arange(6, 11), (3, 5)))
    row_by_row_read = Read(jnp.array([[6, 7, 8, 9, 10], [2, 3, 4, 5, 6], [4, 5, 6, 7, 8]]))
    packed_read = Read(jnp.array([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [2, 3, 4, 5, 6], [1, 2, 3, 4, 5], [4, 5, 6, 7, 8]]),
                       jnp.array([0, 0, 1, 1, 2]))
    weights = jax.random.normal(jax.random.key(3), (5, 5, cfg.vocab_size))
    for batch_mask, batch_positions, read in ((mask, None, padded_read), (segments, positions, row_by_row_read),
                                              (segments, positions, packed_read)):
        whole_logits, whole_hidden = forward(cfg, params, tokens, batch_mask, positions=batch_positions)
        read_logits, read_hidden = forward(cfg, params, tokens, batch_mask, positions=batch_positions, read=read)
        assert read_logits.shape == (read.slots.shape[0], 5, cfg.vocab_size)
        np.testing.assert_allclose(np.asarray(read_logits), np.asarray(read.take(whole_logits)), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(read_hidden), np.asarray(read.take(whole_hidden)), atol=1e-5, rtol=1e-5)
        loss = lambda p, r: (forward(cfg, p, tokens, batch_mask, positions=batch_positions, read=r)[0]
                             * weights[:r.slots.shape[0]]).sum()
        whole = lambda p: (read.take(forward(cfg, p, tokens, batch_mask, positions=batch_positions)[0])
                           * weights[:read.slots.shape[0]]).sum()
        jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5),
                     jax.grad(loss)(params, read), jax.grad(whole)(params))


def test_causal_blocks_skip_only_masked_scores():
    """A forward without a cache attends in blocks of queries over the keys up to each block's end
    (150 slots: blocks of 64, 64 and 22): the same outputs and gradients as all queries over all
    keys, on left-padded rows and on packed ones."""
    seq, kv_heads, groups, head_dim = 150, 2, 2, 8
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (3, seq, kv_heads, groups, head_dim))
    k, v = (jax.random.normal(key, (3, kv_heads, seq, head_dim)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape)
    padded = jnp.asarray(np.arange(seq)[None] >= np.array([[0], [40], [100]]), jnp.int32)
    packed = jnp.asarray(np.repeat([[1, 2, 3, 0], [1, 1, 2, 2], [1, 2, 2, 2]], [70, 30, 40, 10], axis=1))
    for mask, segments in ((padded, None), (packed, packed)):
        real = (mask > 0)[:, :, None, None, None]
        full = lambda q, k, v: attention(q, k, v, mask > 0, 0, segments) * real
        blocked = lambda q, k, v: causal_block_attention(q, k, v, mask > 0, segments) * real
        np.testing.assert_allclose(blocked(q, k, v), full(q, k, v), atol=1e-6)
        want = jax.grad(lambda *x: (full(*x) * cotangent).sum(), argnums=(0, 1, 2))(q, k, v)
        got = jax.grad(lambda *x: (blocked(*x) * cotangent).sum(), argnums=(0, 1, 2))(q, k, v)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5), got, want)
