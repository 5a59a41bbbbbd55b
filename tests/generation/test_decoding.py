"""Caption generation: cached decoding matches teacher forcing; beam search is sound."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vtfuse.config import ModelConfig, TextConfig, VisionConfig
from vtfuse.generation import beam_search, greedy, nucleus
from vtfuse.linear import Linear
from vtfuse.models import Captioner, create_model

VOCAB, BOS, EOS, PAD = 30, 1, 2, 0
MAX_LENGTH = 12
CONFIG = ModelConfig(
    task="caption",
    vision=VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=1, heads=2),
    text=TextConfig(vocab_size=VOCAB, dim=32, depth=2, heads=2, max_length=32),
)


def randomise(model: Captioner, seed: int) -> None:
    """Set every weight from a seeded generator, independently of the package's own init.

    Plain random weights repeat one token forever; the scales below make the captions depend
    on position and image, and make some (not all) of them end with <eos> within MAX_LENGTH.
    """
    g = torch.Generator().manual_seed(seed)
    input_major = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in input_major:  # drawn as (out, in), as nn.Linear stores it
                w = torch.randn(p.shape[::-1], generator=g) / math.sqrt(p.shape[0])
                p.copy_(w.t())
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                is_gain = "norm" in name and name.endswith("weight")
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if is_gain else 0.0))
        decoder = model.text
        scale = decoder.embedding_scale  # the forward pass multiplies embeddings by it
        decoder.token_embedding.weight.copy_(
            torch.randn(decoder.token_embedding.weight.shape, generator=g) * 0.5 / scale
        )
        positions = decoder.context.position_embedding.weight
        positions.copy_(torch.randn(positions.shape, generator=g) * 2.0 / scale)
        for block in decoder.blocks:
            block.fusion.attn.to_out.weight.mul_(4.0)
            block.fusion.attn.to_q.weight.mul_(3.0)
        decoder.token_embedding.weight[EOS].mul_(1.5)


@pytest.fixture(scope="module")
def model() -> Captioner:
    model = create_model(CONFIG).eval()
    randomise(model, seed=1)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Four blocky images (3 × 3 random colour cells), uint8 (4, 3, 24, 24)."""
    g = torch.Generator().manual_seed(0)
    cells = torch.rand(4, 3, 3, 3, generator=g)
    return (F.interpolate(cells, size=24, mode="nearest") * 255).to(torch.uint8)


def naive_greedy(model, image, max_length=MAX_LENGTH):
    """Recompute the whole teacher-forced forward pass at every step (no caches)."""
    prefix = torch.tensor([[BOS]])
    out = []
    with torch.no_grad():
        for _ in range(max_length):
            logits, _ = model(image[None], prefix)
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token == EOS:
                break
            prefix = torch.cat([prefix, torch.tensor([[token]])], dim=1)
    return out


def sequence_log_prob(model, image, tokens):
    """Teacher-forced sum of log p(token | earlier tokens, image)."""
    inputs = torch.tensor([[BOS, *tokens[:-1]]])
    with torch.no_grad():
        logits, _ = model(image[None], inputs)
    log_probs = logits[0].double().log_softmax(-1)
    return float(log_probs[torch.arange(len(tokens)), torch.tensor(tokens)].sum())


def test_the_fixture_makes_generation_non_trivial(model, images):
    """If this fails, the model changed: retune `randomise` so the other tests keep their teeth."""
    tokens = greedy(model, images, MAX_LENGTH).tokens
    assert len({tuple(t) for t in tokens}) > 1  # the image matters
    assert all(len(set(t)) > 2 for t in tokens)  # not one token repeated
    assert any(t[-1] == EOS for t in tokens)
    assert any(EOS not in t and len(t) == MAX_LENGTH for t in tokens)


def test_cached_step_logits_equal_teacher_forcing(model, images):
    g = torch.Generator().manual_seed(1)
    tokens = torch.cat(
        [torch.full((4, 1), BOS), torch.randint(4, VOCAB, (4, 9), generator=g)], dim=1
    )
    with torch.no_grad():
        full, _ = model(images, tokens)
        image, caches = model.start(images)
        for t in range(tokens.shape[1]):
            logits, _ = model.step(tokens[:, t : t + 1], image, caches)
            torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-5)
    assert caches[0].self_attn.length == tokens.shape[1]
    assert caches[0].fusion.static
    assert caches[0].fusion.length == model.grid_size[0] * model.grid_size[1]


def test_greedy_equals_uncached_naive_loop(model, images):
    generated = greedy(model, images, MAX_LENGTH)
    assert generated.attention is None
    for b in range(images.shape[0]):
        assert generated.tokens[b] == naive_greedy(model, images[b])


def test_greedy_attention_shape_and_tokens(model, images):
    plain = greedy(model, images, MAX_LENGTH)
    with_maps = greedy(model, images, MAX_LENGTH, need_weights=True)
    assert with_maps.tokens == plain.tokens
    layers, heads = CONFIG.text.depth, CONFIG.text.heads
    n = model.grid_size[0] * model.grid_size[1]
    assert len(with_maps.attention) == images.shape[0]
    for b, (tokens, maps) in enumerate(zip(with_maps.tokens, with_maps.attention, strict=True)):
        assert maps.shape == (len(tokens), layers, heads, n)
        torch.testing.assert_close(maps.sum(-1), torch.ones(len(tokens), layers, heads))
        # the map at each step is the teacher-forced cross-attention of the token fed at that step
        inputs = torch.tensor([[BOS, *tokens[:-1]]])
        with torch.no_grad():
            _, weights = model(images[b : b + 1], inputs, need_weights=True)
        expected = torch.stack([w[0] for w in weights], dim=0).permute(2, 0, 1, 3)  # (T, L, H, N)
        torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)


def test_beam_size_one_equals_greedy(model, images):
    assert beam_search(model, images, beam_size=1, max_length=MAX_LENGTH).tokens == (
        greedy(model, images, MAX_LENGTH).tokens
    )


def test_beam_search_scores_at_least_greedy(model, images):
    greedy_tokens = greedy(model, images, MAX_LENGTH).tokens
    beam_tokens = beam_search(
        model, images, beam_size=4, max_length=MAX_LENGTH, length_penalty=0.0
    ).tokens
    assert beam_tokens != greedy_tokens  # the beam finds something else for some image
    for b in range(images.shape[0]):
        beam = beam_tokens[b]
        assert beam[-1] == EOS or len(beam) == MAX_LENGTH
        assert PAD not in beam
        beam_score = sequence_log_prob(model, images[b], beam)
        greedy_score = sequence_log_prob(model, images[b], greedy_tokens[b])
        assert beam_score >= greedy_score - 1e-5


def test_full_width_beam_is_exact_for_two_steps(model, images):
    """With beam_size = vocabulary and two steps, beam search must return the best of all
    sequences of length ≤ 2 (found here by enumerating them)."""
    result = beam_search(model, images, beam_size=VOCAB, max_length=2, length_penalty=0.0).tokens
    for b in range(images.shape[0]):
        with torch.no_grad():
            first = (
                model(images[b : b + 1], torch.tensor([[BOS]]))[0][0, -1].double().log_softmax(-1)
            )
            prefixes = torch.tensor([[BOS, t] for t in range(VOCAB)])
            second = model(images[b : b + 1].expand(VOCAB, -1, -1, -1), prefixes)[0][:, -1]
            second = second.double().log_softmax(-1)
        best, best_score = None, float("-inf")
        for t1 in range(VOCAB):
            if t1 == EOS:
                candidates = [([t1], float(first[t1]))]
            else:
                candidates = [([t1, t2], float(first[t1] + second[t1, t2])) for t2 in range(VOCAB)]
            for seq, score in candidates:
                if score > best_score:
                    best, best_score = seq, score
        assert result[b] == best
        assert sequence_log_prob(model, images[b], result[b]) == pytest.approx(best_score, abs=1e-4)


def test_length_penalty_prefers_longer_finished_beams(model, images):
    short = beam_search(
        model, images, beam_size=4, max_length=MAX_LENGTH, length_penalty=0.0
    ).tokens
    long = beam_search(model, images, beam_size=4, max_length=MAX_LENGTH, length_penalty=2.0).tokens
    assert sum(map(len, long)) >= sum(map(len, short))


def test_batched_greedy_equals_one_image_at_a_time(model, images):
    batch = images[:3]
    together = greedy(model, batch, MAX_LENGTH, need_weights=True)
    for b in range(3):
        alone = greedy(model, batch[b : b + 1], MAX_LENGTH, need_weights=True)
        assert together.tokens[b] == alone.tokens[0]
        torch.testing.assert_close(together.attention[b], alone.attention[0], atol=1e-5, rtol=1e-4)


def test_batched_beam_search_equals_one_image_at_a_time(model, images):
    together = beam_search(model, images[:3], beam_size=3, max_length=MAX_LENGTH).tokens
    for b in range(3):
        assert (
            together[b]
            == beam_search(model, images[b : b + 1], beam_size=3, max_length=MAX_LENGTH).tokens[0]
        )


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1).repeat(4000, 1)
    probs = logits[0].exp()  # 0.64, 0.24, 0.09, 0.03
    drawn = nucleus(top_p=0.8, generator=torch.Generator().manual_seed(0))(logits)[:, 0]
    counts = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert counts[2:].sum() == 0  # 0.64 < 0.8 ≤ 0.64 + 0.24: the first two only
    expected = probs[:2] / probs[:2].sum()
    torch.testing.assert_close(counts[:2], expected, atol=0.03, rtol=0)
    tiny = nucleus(top_p=0.01)(logits[:5])
    assert tiny.flatten().tolist() == [0] * 5  # the most likely token always stays
    cold = nucleus(temperature=1e-4, generator=torch.Generator().manual_seed(1))
    assert cold(logits[:5]).flatten().tolist() == [0] * 5
    with pytest.raises(ValueError, match="temperature > 0"):
        nucleus(temperature=0)


def test_sampling_decodes_through_the_caches(model, images):
    greedy_tokens = greedy(model, images, max_length=8).tokens
    cold = nucleus(temperature=1e-6, generator=torch.Generator().manual_seed(0))
    assert greedy(model, images, max_length=8, pick=cold).tokens == greedy_tokens
    draws = {
        str(
            greedy(
                model, images, 8, pick=nucleus(2.0, generator=torch.Generator().manual_seed(s))
            ).tokens
        )
        for s in range(4)
    }
    assert len(draws) > 1  # a hot sampler varies with the seed
