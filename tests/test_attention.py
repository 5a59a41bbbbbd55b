"""MultiHeadAttention: fast path (SDPA) == reference path == a plain implementation written here."""

from __future__ import annotations

import math

import pytest
import torch

from vtfuse.attention import SCORES, KVCache, MultiHeadAttention, attention_mask

SCORE_NAMES = ("dot", "cosine", "neg_distance")
DIM, HEADS, CONTEXT_DIM = 32, 4, 24
B, T, S = 2, 5, 7


def plain_attention(module, score, x, context=None, key_mask=None, causal=False):
    """Attention written out per batch row and per head, from the module's own weights."""
    source = x if context is None else context
    dim = module.to_q.weight.shape[1]  # vtfuse.linear.Linear: y = x·W + b, W is (in, out)
    heads = module.heads
    d = dim // heads
    q = x @ module.to_q.weight + module.to_q.bias
    kv = source @ module.to_kv.weight + module.to_kv.bias
    k, v = kv[..., :dim], kv[..., dim:]
    batch, queries, keys = x.shape[0], x.shape[1], source.shape[1]
    out = torch.zeros(batch, queries, dim, dtype=x.dtype)
    weights = torch.zeros(batch, heads, queries, keys, dtype=x.dtype)
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            qh, kh, vh = q[b, :, cols], k[b, :, cols], v[b, :, cols]
            if score == "dot":
                logits = qh @ kh.T / math.sqrt(d)
            elif score == "cosine":
                tau = math.exp(module.score.log_temperature.item())
                qn = qh / qh.norm(dim=-1, keepdim=True)
                kn = kh / kh.norm(dim=-1, keepdim=True)
                logits = tau * (qn @ kn.T)
            else:
                logits = -((qh[:, None, :] - kh[None, :, :]) ** 2).sum(-1)
            allowed = torch.ones(queries, keys, dtype=torch.bool)
            if key_mask is not None:
                allowed &= key_mask[b][None, :].bool()
            if causal:
                for i in range(queries):
                    for j in range(keys):
                        if j > i + keys - queries:
                            allowed[i, j] = False
            shift = logits.masked_fill(~allowed, float("-inf")).max(dim=-1, keepdim=True).values
            e = torch.where(allowed, torch.exp(logits - shift), torch.zeros_like(logits))
            w = e / e.sum(dim=-1, keepdim=True)
            weights[b, h] = w
            out[b, :, cols] = w @ vh
    return out @ module.to_out.weight + module.to_out.bias, weights


def make_module(score, context_dim=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    module = MultiHeadAttention(DIM, HEADS, context_dim=context_dim, score=score).eval()
    if score == "cosine":
        with torch.no_grad():
            module.score.log_temperature.fill_(math.log(7.3))  # not the initial value
    return module.to(dtype)


def padding_mask(length):
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[1, -2:] = False  # right padding on the second row
    return mask


# name -> (uses context, key mask?, causal)
CASES = {
    "none": (False, False, False),
    "key_padding": (False, True, False),
    "causal": (False, False, True),
    "causal_padding": (False, True, True),
    "cross_masked": (True, True, False),
}


def inputs(case, dtype, seed=1):
    use_context, masked, causal = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DIM, generator=g, dtype=dtype)
    context = torch.randn(B, S, CONTEXT_DIM, generator=g, dtype=dtype) if use_context else None
    keys = S if use_context else T
    key_mask = padding_mask(keys) if masked else None
    return x, context, key_mask, causal


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("score", SCORE_NAMES)
def test_fast_equals_reference_equals_plain(score, case, dtype, tol):
    x, context, key_mask, causal = inputs(case, dtype)
    module = make_module(score, CONTEXT_DIM if context is not None else None, dtype)
    with torch.no_grad():
        fast, no_weights = module(x, context, key_mask=key_mask, causal=causal)
        ref, weights = module(x, context, key_mask=key_mask, causal=causal, need_weights=True)
        plain_out, plain_weights = plain_attention(module, score, x, context, key_mask, causal)

    assert no_weights is None
    assert fast.shape == ref.shape == (B, T, DIM)
    torch.testing.assert_close(fast, ref, atol=tol, rtol=0)
    torch.testing.assert_close(ref, plain_out, atol=tol, rtol=0)
    torch.testing.assert_close(fast, plain_out, atol=tol, rtol=0)

    keys = S if context is not None else T
    assert weights.shape == (B, HEADS, T, keys)
    torch.testing.assert_close(weights, plain_weights, atol=tol, rtol=0)
    torch.testing.assert_close(
        weights.sum(-1), torch.ones(B, HEADS, T, dtype=dtype), atol=tol, rtol=0
    )
    allowed = attention_mask(key_mask, causal, T, keys, x.device)
    if allowed is not None:
        blocked = ~allowed.expand(B, HEADS, T, keys)
        assert blocked.any()
        assert torch.all(weights[blocked] == 0)
        assert torch.all(weights[~blocked] > 0)


def test_plain_reference_is_not_vacuous():
    """The three scores really give different attention, and masks really change it."""
    x, _, key_mask, _ = inputs("key_padding", torch.float64)
    outs = {}
    for score in SCORE_NAMES:
        module = make_module(score)
        with torch.no_grad():
            outs[score] = module(x, need_weights=True)[1]
            masked = module(x, key_mask=key_mask, need_weights=True)[1]
        assert not torch.allclose(outs[score], masked)
    assert not torch.allclose(outs["dot"], outs["cosine"])
    assert not torch.allclose(outs["dot"], outs["neg_distance"])


def test_cosine_temperature_is_capped_at_100():
    module = make_module("cosine")
    with torch.no_grad():
        module.score.log_temperature.fill_(math.log(1000.0))
    assert module.score.temperature().item() == pytest.approx(100.0)
    x, _, _, _ = inputs("none", torch.float64)
    with torch.no_grad():
        fast, _ = module(x)
        ref, _ = module(x, need_weights=True)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=0)


def test_registry_and_width_check():
    assert set(SCORE_NAMES) <= set(SCORES.names())
    with pytest.raises(ValueError, match="unknown attention score 'nope'"):
        MultiHeadAttention(DIM, HEADS, score="nope")
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadAttention(30, 4)


def test_attention_mask_causal_offset_for_cached_queries():
    mask = attention_mask(None, True, num_queries=2, num_keys=5, device=torch.device("cpu"))
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert mask.shape == (1, 1, 2, 5)
    assert torch.equal(mask[0, 0], expected)
    assert attention_mask(None, False, 2, 5, torch.device("cpu")) is None
    key_mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    combined = attention_mask(key_mask, True, 3, 3, torch.device("cpu"))
    assert combined.shape == (2, 1, 3, 3)
    assert torch.equal(
        combined[1, 0], torch.tensor([[1, 0, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("score", SCORE_NAMES)
def test_cached_incremental_equals_full_causal(score, masked, need_weights, dtype, tol):
    module = make_module(score, dtype=dtype)
    x, _, _, _ = inputs("causal", dtype, seed=5)
    key_mask = padding_mask(T) if masked else None
    cache = KVCache()
    steps, step_weights = [], []
    with torch.no_grad():
        full, full_weights = module(x, key_mask=key_mask, causal=True, need_weights=True)
        for t in range(T):
            out, w = module(
                x[:, t : t + 1],
                key_mask=None if key_mask is None else key_mask[:, : t + 1],
                causal=True,
                cache=cache,
                need_weights=need_weights,
            )
            assert cache.length == t + 1
            assert cache.key[:, :, : cache.length].shape == (B, HEADS, t + 1, DIM // HEADS)
            steps.append(out)
            step_weights.append(w)
    incremental = torch.cat(steps, dim=1)
    assert not cache.static
    torch.testing.assert_close(incremental, full, atol=tol, rtol=0)
    if need_weights:
        for t, w in enumerate(step_weights):
            assert w.shape == (B, HEADS, 1, t + 1)
            torch.testing.assert_close(w[:, :, 0], full_weights[:, :, t, : t + 1], atol=tol, rtol=0)


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_cross_attention_cache_is_filled_once_and_reused(score):
    module = make_module(score, CONTEXT_DIM)
    g = torch.Generator().manual_seed(7)
    x1 = torch.randn(B, 1, DIM, generator=g, dtype=torch.float64)
    x2 = torch.randn(B, 1, DIM, generator=g, dtype=torch.float64)
    context = torch.randn(B, S, CONTEXT_DIM, generator=g, dtype=torch.float64)
    other = torch.randn(B, S, CONTEXT_DIM, generator=g, dtype=torch.float64)
    cache = KVCache()
    with torch.no_grad():
        first, _ = module(x1, context, cache=cache)
        assert cache.static
        assert cache.key.shape == (B, HEADS, S, DIM // HEADS)
        key = cache.key
        # a different context on the second call is ignored: the cached image K/V are reused
        second, _ = module(x2, other, cache=cache)
        second_w, weights = module(x2, other, cache=cache, need_weights=True)
        expected, expected_w = module(x2, context, need_weights=True)
        fresh, _ = module(x2, other)
        no_cache_first, _ = module(x1, context)
    assert cache.key is key and cache.length == S
    torch.testing.assert_close(first, no_cache_first, atol=1e-12, rtol=0)
    torch.testing.assert_close(second, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(second_w, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(weights, expected_w, atol=1e-12, rtol=0)
    assert not torch.allclose(second, fresh)


def test_context_index_shares_context_rows():
    module = make_module("dot", CONTEXT_DIM)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, T, DIM, generator=g, dtype=torch.float64)
    images = torch.randn(2, S, CONTEXT_DIM, generator=g, dtype=torch.float64)
    index = torch.tensor([1, 0, 1])
    with torch.no_grad():
        shared, w_shared = module(x, images, context_index=index, need_weights=True)
        expanded, w_expanded = module(x, images[index], need_weights=True)
        fast_shared, _ = module(x, images, context_index=index)
        cache = KVCache()
        cached, _ = module(x, images, context_index=index, cache=cache)
    torch.testing.assert_close(shared, expanded, atol=1e-12, rtol=0)
    torch.testing.assert_close(w_shared, w_expanded, atol=1e-12, rtol=0)
    torch.testing.assert_close(fast_shared, expanded, atol=1e-10, rtol=0)
    torch.testing.assert_close(cached, expanded, atol=1e-10, rtol=0)
    assert cache.key.shape[0] == 3


def test_kv_cache_append_and_reorder():
    g = torch.Generator().manual_seed(0)
    k1, v1 = torch.randn(3, 2, 1, 4, generator=g), torch.randn(3, 2, 1, 4, generator=g)
    k2, v2 = torch.randn(3, 2, 1, 4, generator=g), torch.randn(3, 2, 1, 4, generator=g)
    cache = KVCache()
    assert cache.length == 0
    cache.reorder(torch.tensor([0, 0, 0]))  # empty: nothing to do
    cache.append(k1, v1)
    key, value = cache.append(k2, v2)
    assert cache.length == 2
    torch.testing.assert_close(key, torch.cat([k1, k2], dim=2))
    torch.testing.assert_close(value, torch.cat([v1, v2], dim=2))

    index = torch.tensor([2, 0, 0])
    key, value = key.clone(), value.clone()
    cache.reorder(index)
    torch.testing.assert_close(cache.current(), (key[index], value[index]))

    steps = [torch.randn(3, 2, 1, 4, generator=g) for _ in range(40)]  # past two regrowths
    for step in steps:
        grown = cache.append(step, -step)
    assert cache.length == 42
    torch.testing.assert_close(grown[0], torch.cat([key[index], *steps], dim=2))
    torch.testing.assert_close(grown[1], torch.cat([value[index], *(-s for s in steps)], dim=2))

    static = KVCache()
    static.fill(key.clone(), value.clone())
    static.reorder(index)
    torch.testing.assert_close(static.key, key)
    torch.testing.assert_close(static.value, value)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    module = MultiHeadAttention(DIM, HEADS, dropout=0.5).double()
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    module.eval()
    with torch.no_grad():
        a, _ = module(x)
        b, _ = module(x)
        ref, _ = module(x, need_weights=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, ref, atol=1e-10, rtol=0)
    module.train()
    with torch.no_grad():
        dropped, _ = module(x)
    assert not torch.allclose(dropped, a)


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_decoding_step_on_the_plain_path_equals_reference(score):
    """One query per row over a few keys with many rows takes the plain matmul path on CPU
    (`_plain_is_faster`); it must give the reference's output, with and without padding."""
    from vtfuse.attention import _plain_is_faster

    module = make_module(score, context_dim=CONTEXT_DIM)
    rows = 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 1, DIM, generator=g, dtype=torch.float64)
    context = torch.randn(rows, S, CONTEXT_DIM, generator=g, dtype=torch.float64)
    key_mask = torch.rand(rows, S, generator=g) > 0.3
    key_mask[:, 0] = True
    q = torch.zeros(rows, HEADS, 1, DIM // HEADS)
    assert _plain_is_faster(q, torch.zeros(rows, HEADS, S, DIM // HEADS))
    with torch.no_grad():
        for mask in (None, key_mask):
            fast, _ = module(x, context, key_mask=mask)
            reference, _ = module(x, context, key_mask=mask, need_weights=True)
            torch.testing.assert_close(fast, reference, atol=1e-10, rtol=0)
