"""Cross-attention injected into Hugging Face causal LMs, tested offline: tiny random configs
are saved with `save_pretrained` and loaded back through the path a hub name takes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, Qwen2Config

from vtfuse.config import VisionConfig
from vtfuse.generation import beam_search, greedy
from vtfuse.models.base import CheckpointError
from vtfuse.models.pretrained_lm import LMCaptioner, decoder_layers, load_causal_lm

VOCAB, BOS, EOS = 64, 1, 2
FAMILIES = {
    "gpt2": lambda: GPT2Config(
        n_embd=32, n_layer=3, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=BOS,
        eos_token_id=EOS,
    ),
    "llama": lambda: LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=BOS,
        eos_token_id=EOS,
    ),
    "qwen2": lambda: Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=BOS,
        eos_token_id=EOS,
    ),
}  # fmt: skip
VISION = VisionConfig(image_size=24, channels=(8, 8, 16), dim=16, depth=0, heads=2)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def lm_folder(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(FAMILIES[request.param]()).save_pretrained(folder)
    return folder


def fused(folder, every: int = 1, gates: float | None = None, **options) -> LMCaptioner:
    torch.manual_seed(1)
    model = LMCaptioner(load_causal_lm(str(folder)), VISION, xattn_every=every, **options)
    model.eval()
    if gates is not None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("gate"):
                    parameter.fill_(gates)
    return model


def batch(rows: int = 2, length: int = 6):
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (rows, 3, 24, 24), generator=g, dtype=torch.uint8)
    return images, torch.randint(3, VOCAB, (rows, length), generator=g)


def test_zero_gates_leave_the_lm_exactly_as_it_was(lm_folder):
    base = load_causal_lm(str(lm_folder)).eval()
    model = fused(lm_folder)
    images, tokens = batch()
    with torch.no_grad():
        expected = base(input_ids=tokens).logits
        logits, _ = model(images, tokens)
    assert (logits - expected).abs().max() <= 1e-6
    with torch.no_grad():  # and the image does matter once the gates open
        opened, _ = fused(lm_folder, gates=0.5)(images, tokens)
    assert (opened - expected).abs().max() > 1e-3


@pytest.mark.parametrize("every", [1, 2])
def test_blocks_go_before_every_kth_layer(lm_folder, every):
    model = fused(lm_folder, every=every)
    layers = decoder_layers(model.lm)
    wrapped = [i for i, layer in enumerate(layers) if hasattr(layer, "fusion")]
    assert wrapped == list(range(0, len(layers), every))
    images, tokens = batch()
    _, weights = model(images, tokens, need_weights=True)
    assert len(weights) == len(wrapped)
    assert weights[0].shape == (2, 2, tokens.shape[1], model.grid_size[0] * model.grid_size[1])


def test_cached_generation_equals_recomputation(lm_folder):
    model = fused(lm_folder, gates=0.5)
    images, _ = batch()
    generated = greedy(model, images, max_length=6, bos_id=BOS, eos_id=EOS)
    with torch.no_grad():
        for row in range(2):
            prefix = torch.tensor([[BOS, *generated.tokens[row][:-1]]])
            logits, _ = model(images[row : row + 1], prefix)
            assert logits[0].argmax(-1).tolist() == generated.tokens[row]
    beams = beam_search(model, images, beam_size=1, max_length=6, bos_id=BOS, eos_id=EOS)
    assert beams.tokens == generated.tokens
    wide = beam_search(model, images, beam_size=3, max_length=6, bos_id=BOS, eos_id=EOS)
    assert len(wide.tokens) == 2 and all(wide.tokens)


def test_a_frozen_lm_trains_only_what_is_new(lm_folder):
    model = fused(lm_folder).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, tokens = batch()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # two steps: the gates open first, then the blocks behind them learn
        loss = model.training_loss({"images": images, "tokens": tokens})
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for name, parameter in model.named_parameters():
        new = name.startswith("vision.") or ".fusion." in name
        assert parameter.requires_grad == new, name
        assert torch.equal(parameter, before[name]) != new, name
    saved = model.trainable_state_dict()
    assert saved and all(n.startswith("vision.") or ".fusion." in n for n in saved)


def test_an_lm_without_a_layer_stack_is_refused():
    class Odd(torch.nn.Module):
        config = GPT2Config(n_layer=3)

    with pytest.raises(ValueError, match="cannot find the decoder layers of Odd"):
        decoder_layers(Odd())


def test_save_and_load_round_trip_exactly(lm_folder, tmp_path):
    model = fused(lm_folder, every=2, gates=0.3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".fusion." in name:
                parameter.add_(0.01 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "saved")
    files = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert files == ["adapter.safetensors", "config.json"]  # the frozen LM is not copied
    loaded = LMCaptioner.from_pretrained(tmp_path / "saved")
    images, tokens = batch()
    with torch.no_grad():
        assert torch.equal(model(images, tokens)[0], loaded(images, tokens)[0])
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    config["format_version"] = 1
    (tmp_path / "saved" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a format-2 lm_captioner"):
        LMCaptioner.from_pretrained(tmp_path / "saved")


def test_packaged_minilm_becomes_a_decoder_with_a_new_head():
    """The real MiniLM-L6 (BERT) from its package, offline: causal, six wrapped layers, its
    encoder frozen, the LM head it never had trained from scratch."""
    torch.manual_seed(0)  # the same untrained head in both copies
    lm = load_causal_lm("minilm")
    assert lm.config.is_decoder and lm.name_or_path == "minilm"
    assert lm.new_weights and all(n.startswith("cls.") for n in lm.new_weights)
    torch.manual_seed(0)
    base = load_causal_lm("minilm").eval()
    model = LMCaptioner(lm, VISION, xattn_every=3).eval()
    assert len(model.inserted) == 2
    images, tokens = batch()
    tokens = tokens + 1000  # ordinary word pieces
    with torch.no_grad():
        assert (model(images, tokens)[0] - base(input_ids=tokens).logits).abs().max() <= 1e-5
        changed = tokens.clone()
        changed[:, 3:] += 1
        early = base(input_ids=changed).logits[:, :3]  # causal: later words change nothing
    torch.testing.assert_close(early, base(input_ids=tokens).logits[:, :3])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("lm.cls.") for n in trainable)
    assert not any(".attention." in n and ".fusion." not in n for n in trainable)


IMAGE = 3  # the <image> token of the interleaving tests
SEQUENCES = torch.tensor([[5, 6, IMAGE, 7, 8, IMAGE, 9, 10], [5, IMAGE, 6, 7, 8, 9, IMAGE, 10]])


def interleaved_images(seed: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 2, 3, 24, 24), generator=g, dtype=torch.uint8)  # M = 2


def test_each_word_sees_only_its_latest_image(lm_folder):
    model = fused(lm_folder, gates=0.5, image_token_id=IMAGE)
    images, per_image = interleaved_images(), model.grid_size[0] * model.grid_size[1]
    with torch.no_grad():
        logits, weights = model(images, SEQUENCES, need_weights=True)
        base = load_causal_lm(str(lm_folder)).eval()(input_ids=SEQUENCES).logits
    latest = (SEQUENCES == IMAGE).cumsum(1) - 1  # (B, T)
    for block in weights:
        on_image = block.mean(1).unflatten(-1, (2, per_image)).sum(-1)  # (B, T, M)
        for row in range(2):
            for t in range(SEQUENCES.shape[1]):
                if latest[row, t] >= 0:
                    expected = torch.zeros(2)
                    expected[latest[row, t]] = 1.0
                    torch.testing.assert_close(on_image[row, t], expected)
    before_first = latest < 0
    torch.testing.assert_close(logits[before_first], base[before_first], atol=0, rtol=0)
    assert not torch.allclose(logits[~before_first], base[~before_first])

    second = images.clone()
    second[:, 1] = 255 - second[:, 1]  # change only the second image
    with torch.no_grad():
        changed, _ = model(second, SEQUENCES)
    sees_first = latest == 0
    torch.testing.assert_close(changed[sees_first], logits[sees_first])
    assert not torch.allclose(changed[latest == 1], logits[latest == 1])


def test_words_may_see_every_image_so_far(lm_folder):
    model = fused(lm_folder, gates=0.5, image_token_id=IMAGE, attend_to_all_images=True)
    per_image = model.grid_size[0] * model.grid_size[1]
    with torch.no_grad():
        _, weights = model(interleaved_images(), SEQUENCES, need_weights=True)
    on_image = weights[0].mean(1).unflatten(-1, (2, per_image)).sum(-1)
    after_second = (SEQUENCES == IMAGE).cumsum(1) == 2
    assert (on_image[after_second] > 0.01).all()


def test_few_shot_prompt_decodes_with_caches(lm_folder):
    model = fused(lm_folder, gates=0.5, image_token_id=IMAGE)
    images, prompt = interleaved_images(), SEQUENCES[:, :6]
    generated = greedy(model, images, max_length=5, bos_id=BOS, eos_id=EOS, prompt=prompt)
    with torch.no_grad():
        for row in range(2):
            sequence = torch.cat([prompt[row], torch.tensor(generated.tokens[row][:-1])])
            logits, _ = model(images[row : row + 1], sequence[None])
            assert logits[0, 5:].argmax(-1).tolist() == generated.tokens[row]
