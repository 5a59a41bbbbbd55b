"""Every fusion strategy behind one interface: shapes, gradients, maps, caches, learning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vtfuse.attention import SCORES, KVCache
from vtfuse.config import FusionConfig, ModelConfig, TextConfig, VisionConfig
from vtfuse.fusion import FUSIONS
from vtfuse.fusion.relation import marginalise, pooling_matrix
from vtfuse.generation import greedy
from vtfuse.models import create_model

STRATEGIES = FUSIONS.names()
DUAL_STREAM = [name for name in STRATEGIES if not FUSIONS.get(name).single_stream]
DIM, HEADS, IMAGE_DIM = 32, 2, 16


def build(name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return FUSIONS.get(name)(DIM, HEADS, IMAGE_DIM, FusionConfig(name=name, latents=4, **options))


def open_gates(module: torch.nn.Module, value: float = 0.5) -> None:
    """Gated strategies start closed (output = input); open them so every weight matters."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("gate"):
                parameter.fill_(value)


def inputs(text_rows: int = 3, image_tokens: int = 9):
    g = torch.Generator().manual_seed(1)
    text = torch.randn(text_rows, 5, DIM, generator=g)
    image = torch.randn(2, image_tokens, IMAGE_DIM, generator=g)
    return text, image, torch.tensor([0, 1, 1])[:text_rows]


def test_all_strategies_are_registered():
    assert {
        "concat",
        "co_attention",
        "cross_attention",
        "film",
        "gated_cross_attention",
        "similarity",
        "relation",
        "resampler",
        "weighted_sum",
    } <= set(STRATEGIES)


@pytest.mark.parametrize("name", DUAL_STREAM)
def test_shapes_and_attention_maps(name):
    fusion = build(name)
    text, image, index = inputs()
    out, _, weights = fusion(text, image, image_index=index, need_weights=True)
    assert out.shape == text.shape
    assert weights.dim() == 4 and weights.shape[0] == 3 and weights.shape[2:] == (5, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:3]))
    assert fusion(text, image, image_index=index)[2] is None  # only when asked


@pytest.mark.parametrize("name", DUAL_STREAM)
def test_the_image_changes_the_text(name):
    fusion = build(name)
    open_gates(fusion)
    text, image, index = inputs()
    other = image.flip(1) * 2 + 1
    assert not torch.allclose(
        fusion(text, image, image_index=index)[0], fusion(text, other, image_index=index)[0]
    )


@pytest.mark.parametrize("name", DUAL_STREAM)
def test_gradients_reach_every_parameter(name):
    fusion = build(name)
    open_gates(fusion)
    text, image, index = inputs()
    image.requires_grad_(True)
    out, stream, _ = fusion(text, image, image_index=index)
    (out * torch.randn_like(out)).sum().backward(retain_graph=True)
    if stream is not image:  # co-attention's image stream carries its own parameters
        (stream * torch.randn_like(stream)).sum().backward()
    for parameter_name, parameter in fusion.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name
    assert image.grad.abs().sum() > 0


def test_gated_cross_attention_is_exactly_the_identity_at_initialisation():
    fusion = build("gated_cross_attention")
    text, image, index = inputs()
    out, _, _ = fusion(text, image, image_index=index)
    assert torch.equal(out, text)
    open_gates(fusion, 0.1)
    assert not torch.equal(fusion(text, image, image_index=index)[0], text)


def test_resampler_output_does_not_depend_on_the_number_of_image_tokens():
    fusion = build("resampler")
    for tokens in (9, 49, 196):
        _, image, _ = inputs(image_tokens=tokens)
        latents, weights = fusion.resample(image, need_weights=True)
        assert latents.shape == (2, 4, DIM)
        assert weights.shape == (2, HEADS, 4, tokens)


def test_film_starts_as_cross_attention_and_then_modulates_the_image_by_the_question():
    """Gate closed (initialisation): the image stream passes untouched and the text reads it as
    plain cross-attention would. Gate open, generator at zero: the same modulation (γ = 1,
    β = 0) whatever the question. Generator trained: two questions about one image give two
    image streams, and in a decoder position t's stream depends on the words ≤ t only."""
    film = build("film")
    plain = build("cross_attention")
    plain.load_state_dict(film.read.state_dict())
    text, image, index = inputs()
    out, stream, weights = film(text, image, image_index=index, need_weights=True)
    expected, _, expected_weights = plain(text, image, image_index=index, need_weights=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)
    assert torch.equal(stream[:, 0], image[index])

    open_gates(film)
    question, other, one = text[1:2], text[2:3], torch.tensor([1])  # both about image 1
    first = film(question, image, image_index=one)[1]
    assert first.shape == (1, 1, 9, IMAGE_DIM)
    assert not torch.allclose(first[:, 0], image[1])  # the open gate adds ReLU(F)
    torch.testing.assert_close(first, film(other, image, image_index=one)[1])
    with torch.no_grad():  # a generator as training leaves it
        film.generator_weight.normal_(std=DIM**-0.5)
        film.generator_bias.normal_(std=0.1)
    first = film(question, image, image_index=one)[1]
    assert not torch.allclose(first, film(other, image, image_index=one)[1])

    changed = text.clone()
    changed[:, 3:] = torch.randn_like(changed[:, 3:])
    full, causal, _ = film(text, image, image_index=index, causal=True)
    later = film(changed, image, image_index=index, causal=True)[1]
    assert causal.shape == (3, 5, 9, IMAGE_DIM)  # one image stream per position
    torch.testing.assert_close(causal[:, :3], later[:, :3])
    assert not torch.allclose(causal[:, 3:], later[:, 3:])
    cache, steps = KVCache(), []  # the running mean continues across decoding steps
    for start, end in [(0, 2), (2, 3), (3, 5)]:
        steps.append(film(text[:, start:end], image, image_index=index, causal=True, cache=cache))
    torch.testing.assert_close(torch.cat([step[0] for step in steps], dim=1), full)
    torch.testing.assert_close(torch.cat([step[1] for step in steps], dim=1), causal)


def test_relation_pools_to_at_most_relation_side_squared_objects():
    """The pair count is capped: 196 tokens (14 × 14) → 6 × 6 objects → 1296 pair tokens."""
    fusion = build("relation")
    for tokens, objects in ((9, 9), (36, 36), (49, 36), (196, 36)):
        _, image, _ = inputs(image_tokens=tokens)
        pairs = fusion.pair_tokens(fusion.objects(image)[0])
        assert pairs.shape == (2, objects**2, DIM)
    small = build("relation", relation_side=2)
    _, image, _ = inputs(image_tokens=196)
    assert small.pair_tokens(small.objects(image)[0]).shape == (2, 16, DIM)
    with pytest.raises(ValueError, match="square token grid"):
        small.objects(torch.randn(2, 18, IMAGE_DIM))  # a clip of 2 frames × 3 × 3


def test_relation_objects_are_pooled_cells_with_their_coordinates():
    _, image, _ = inputs(image_tokens=196)
    for side in (6, 7):  # 14 → 6: overlapping windows; 14 → 7: disjoint 2 × 2 blocks
        fusion = build("relation", relation_side=side)
        objects, pooling = fusion.objects(image)
        grid = image.transpose(1, 2).reshape(2, IMAGE_DIM, 14, 14)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)
        torch.testing.assert_close(objects[..., :-2], pooled)
        torch.testing.assert_close(pooling.sum(-1), torch.ones(side * side))
    objects, pooling = build("relation").objects(inputs()[1])  # 3 × 3 ≤ 6 × 6: not pooled
    assert pooling is None
    third = 2 / 3
    torch.testing.assert_close(objects[0, 2, -2:], torch.tensor([third, -third]))  # top right
    torch.testing.assert_close(objects[1, 3, -2:], torch.tensor([-third, 0.0]))  # middle left


def test_relation_first_layer_is_a_linear_map_of_the_concatenated_pair():
    fusion = build("relation")
    objects, _ = fusion.objects(inputs()[1])
    decomposed = fusion.g_first(objects)[:, :, None] + fusion.g_second(objects)[:, None]
    pairs = torch.cat(
        [objects[:, :, None].expand(-1, -1, 9, -1), objects[:, None].expand(-1, 9, -1, -1)], -1
    )  # (I, 9, 9, 2·d): [o_i ; o_j]
    weight = torch.cat([fusion.g_first.weight, fusion.g_second.weight])  # (2·d, hidden)
    torch.testing.assert_close(decomposed, pairs @ weight + fusion.g_first.bias)


def test_relation_map_marginalises_the_pairs_and_undoes_the_pooling():
    # 4 × 4 tokens pooled to 2 × 2 cells; cell 0 averages tokens 0, 1, 4, 5, cell 3 10, 11, 14, 15
    pooling = pooling_matrix(4, 2, torch.device("cpu"), torch.float32)
    pair = torch.zeros(2, 16)  # 4 cells → 16 pairs, (i, j) at 4·i + j
    pair[0, 0 * 4 + 3] = 1.0  # all weight on the pair (cell 0, cell 3): ½ to each
    pair[1, 1 * 4 + 1] = 1.0  # all on the self-pair (cell 1, cell 1): all to cell 1
    expected = torch.zeros(2, 16)
    expected[0, [0, 1, 4, 5, 10, 11, 14, 15]] = 1 / 8
    expected[1, [2, 3, 6, 7]] = 1 / 4
    torch.testing.assert_close(marginalise(pair, pooling), expected)

    # the module's map is its attention over the pairs, marginalised; each row sums to 1
    fusion = build("relation", relation_side=2)
    text, image, index = inputs(image_tokens=16)
    _, _, weights = fusion(text, image, image_index=index, need_weights=True)
    objects, pooling = fusion.objects(image)
    pairs = fusion.pair_tokens(objects)
    _, pair_weights = fusion.attn(fusion.norm(text), pairs, context_index=index, need_weights=True)
    assert pair_weights.shape == (3, HEADS, 5, 16)
    torch.testing.assert_close(weights, marginalise(pair_weights, pooling))
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, HEADS, 5))
    cells = weights.view(3, HEADS, 5, 2, 2, 2, 2)  # (cell row, row in cell, cell col, col in cell)
    torch.testing.assert_close(cells, cells[..., :1, :, :1].expand_as(cells))  # spread evenly


def test_relation_caches_the_pair_tokens_once_per_image():
    fusion = build("relation", relation_side=2)
    text, image, index = inputs(image_tokens=16)
    full, _, full_weights = fusion(text, image, image_index=index, need_weights=True)
    cache = KVCache()
    first, _, _ = fusion(text[:, :3], image, image_index=index, cache=cache)
    assert cache.static and cache.length == 16  # 2 × 2 cells: 16 pairs
    later, _, later_weights = fusion(
        text[:, 3:], image, image_index=index, cache=cache, need_weights=True
    )
    torch.testing.assert_close(torch.cat([first, later], 1), full)
    torch.testing.assert_close(later_weights, full_weights[:, :, 3:])


@pytest.mark.parametrize(
    "name",
    [
        "cross_attention",
        "gated_cross_attention",
        "similarity",
        "resampler",
        "co_attention",
        "film",
        "relation",
    ],
)
@pytest.mark.parametrize("score", ["dot", "cosine", "neg_distance"])
def test_attention_strategies_take_every_score(name, score):
    fusion = build(name, score=score)
    open_gates(fusion)
    text, image, index = inputs()
    out, _, weights = fusion(text, image, image_index=index, need_weights=True)
    fast, _, _ = fusion(text, image, image_index=index)
    torch.testing.assert_close(out, fast, atol=1e-5, rtol=1e-5)  # weights path = fast path
    assert weights.shape[-1] == image.shape[1]


def tiny_model(task: str, fusion: str, score: str = "") -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        task=task,
        vision=VisionConfig(image_size=24, channels=(8, 8, 16), dim=IMAGE_DIM, depth=0, heads=2),
        text=TextConfig(vocab_size=12, dim=DIM, depth=2, heads=HEADS, max_length=16),
        fusion=FusionConfig(name=fusion, score=score, latents=4),
        num_answers=3 if task == "vqa" else 0,
    )
    model = create_model(config)
    open_gates(model)
    return model


@pytest.mark.parametrize("name", STRATEGIES)
def test_cached_generation_equals_full_recomputation(name):
    model = tiny_model("caption", name).eval()
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    generated = greedy(model, images, max_length=6)
    with torch.no_grad():
        for row in range(2):
            prefix = torch.tensor([[1, *generated.tokens[row][:-1]]])
            logits, _ = model(images[row : row + 1], prefix)
            assert logits[0].argmax(-1).tolist() == generated.tokens[row]


def caption_batch(rows: int = 2, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (rows, 3, 24, 24), generator=g, dtype=torch.uint8)
    return images, torch.randint(3, 12, (rows, length), generator=g)


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_decoder_never_sees_later_words(name):
    """Co-attention's image stream and concat's joint sequence must stay causal too."""
    model = tiny_model("caption", name).eval()
    images, tokens = caption_batch()
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 12
    with torch.no_grad():
        before, _ = model(images, tokens)
        after, _ = model(images, changed)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


@pytest.mark.parametrize("task", ["caption", "vqa"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_models_return_one_map_over_the_image_per_layer(name, task):
    model = tiny_model(task, name).eval()
    images, tokens = caption_batch()
    with torch.no_grad():
        _, weights = model(images, tokens, need_weights=True)
    grid = model.grid_size[0] * model.grid_size[1]
    assert len(weights) == 2
    for layer in weights:
        assert layer.shape[0] == 2 and layer.shape[2:] == (7, grid)
        torch.testing.assert_close(layer.sum(-1), torch.ones(layer.shape[:3]))


def test_a_film_decoder_conditions_each_word_on_the_words_before_it():
    """The tests above run film's generators at zero (every question modulates alike); with
    trained generators the caption decoder must still see no later word, and decoding from the
    cache (each block's running sum of the words) must give recomputation's logits."""
    model = tiny_model("caption", "film").eval()
    with torch.no_grad():
        for block in model.text.blocks:
            block.fusion.generator_weight.normal_(std=DIM**-0.5)
    images, tokens = caption_batch()
    changed = tokens.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 12
    with torch.no_grad():
        before, _ = model(images, tokens)
        after, _ = model(images, changed)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])
    with torch.no_grad():  # a prompt of three words, then one word a step
        image, caches = model.start(images)
        steps = [model.step(tokens[:, :3], image, caches)[0]]
        steps += [model.step(tokens[:, t : t + 1], image, caches)[0] for t in range(3, 7)]
    torch.testing.assert_close(torch.stack(steps, dim=1), before[:, 2:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", ["caption", "vqa"])
@pytest.mark.parametrize("score", ["dot", "cosine", "neg_distance"])
def test_concat_merges_with_every_score(score, task):
    """concat has no fusion module: the score goes to the blocks' merged self-attention."""
    model = tiny_model(task, "concat", score).eval()
    assert all(isinstance(block.attn.score, SCORES.get(score)) for block in model.text.blocks)
    images, tokens = caption_batch()
    with torch.no_grad():
        fast, _ = model(images, tokens)
        reference, weights = model(images, tokens, need_weights=True)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    assert weights[0].shape[-1] == model.grid_size[0] * model.grid_size[1]


@pytest.mark.parametrize("task", ["caption", "vqa"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_gradients_reach_every_parameter_of_a_model(name, task):
    model = tiny_model(task, name)
    images, tokens = caption_batch()
    logits, _ = model(images, tokens)
    (logits * torch.randn_like(logits)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_learns_a_tiny_task(name):
    """VQA on four fixed images: the answer is which image it is. Loss must fall by half."""
    model = tiny_model("vqa", name)
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (3, 3, 24, 24), generator=g, dtype=torch.uint8)
    batch = {
        "images": images,
        "tokens": torch.randint(4, 12, (6, 4), generator=g),
        "token_mask": torch.ones(6, 4, dtype=torch.bool),
        "image_index": torch.tensor([0, 1, 2, 0, 1, 2]),
        "answers": torch.tensor([0, 1, 2, 0, 1, 2]),
    }
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.training_loss(batch).item()
    for _ in range(40):
        loss = model.training_loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < first / 2, (first, loss.item())


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="unknown fusion strategy 'nope'; choose one of: "):
        FUSIONS.get("nope")
    assert dataclasses.asdict(FusionConfig())["name"] == "cross_attention"
