"""Cross-attention injected into Hugging Face causal LMs, tested offline: tiny random configs
are saved with `save_pretrained` and loaded back through the path a hub name takes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config

from vtfuse.config import FusionConfig, LMConfig, ModelConfig, VisionConfig
from vtfuse.data.tokenizer import LMTokenizer
from vtfuse.generation import beam_search, greedy
from vtfuse.lm.inject import decoder_layers
from vtfuse.lm.load import load_causal_lm, load_lm_tokenizer, load_text_encoder
from vtfuse.models.base import CheckpointError
from vtfuse.models.factory import create_model, load_pretrained
from vtfuse.models.pretrained_lm import LMCaptioner, LMQuestionAnswerer
from vtfuse.models.warm_start import warm_start
from vtfuse.weights import from_pretrained

VOCAB, BOS, EOS = 64, 1, 2
VISION = VisionConfig(image_size=24, channels=(8, 8, 16), dim=16, depth=0, heads=2)


def config(folder, every: int = 1, **options) -> ModelConfig:
    lm = LMConfig(name=str(folder), xattn_every=every, **options)
    return ModelConfig(vision=VISION, fusion=FusionConfig("gated_cross_attention"), lm=lm)


def fused(folder, every: int = 1, gates: float | None = None, **options) -> LMCaptioner:
    torch.manual_seed(1)
    model = create_model(config(folder, every, **options)).eval()
    assert isinstance(model, LMCaptioner)
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


def greedy_equals_recomputation(model, images, max_length: int):
    """Greedy decoding through the caches picks, at every step, the word a full forward pass
    over the prefix picks; the decoded captions are returned."""
    generated = greedy(model, images, max_length=max_length, bos_id=BOS, eos_id=EOS)
    with torch.no_grad():
        for row in range(len(images)):
            prefix = torch.tensor([[BOS, *generated.tokens[row][:-1]]])
            logits, _ = model(images[row : row + 1], prefix)
            assert logits[0].argmax(-1).tolist() == generated.tokens[row]
    return generated


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
    generated = greedy_equals_recomputation(model, images, max_length=6)
    beams = beam_search(model, images, beam_size=1, max_length=6, bos_id=BOS, eos_id=EOS)
    assert beams.tokens == generated.tokens
    wide = beam_search(model, images, beam_size=3, max_length=6, bos_id=BOS, eos_id=EOS)
    assert len(wide.tokens) == 2 and all(wide.tokens)


@pytest.mark.parametrize("strategy", ["co_attention", "film"])
def test_blocks_that_read_the_words_see_no_later_word_in_a_causal_lm(lm_folder, strategy):
    """co_attention's image stream reads the words and film's modulation is conditioned on
    them: inside a causal LM, position t must depend on the words <= t only (the blocks are
    told the LM is a decoder), and cached greedy decoding must equal recomputation."""
    torch.manual_seed(1)
    lm = LMConfig(name=str(lm_folder))
    model = create_model(ModelConfig(vision=VISION, fusion=FusionConfig(strategy), lm=lm)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate"):
                parameter.fill_(0.5)
            elif name.endswith("generator_weight"):
                parameter.normal_(std=0.3)
    images, tokens = batch()
    changed = tokens.clone()
    changed[:, 3:] = (changed[:, 3:] + 1) % VOCAB
    with torch.no_grad():
        logits, _ = model(images, tokens)
        later_changed, _ = model(images, changed)
    torch.testing.assert_close(later_changed[:, :3], logits[:, :3])
    assert not torch.allclose(later_changed[:, 3:], logits[:, 3:])
    greedy_equals_recomputation(model, images, max_length=5)


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
    saved = tmp_path / "saved"
    model.save_pretrained(saved, load_lm_tokenizer(str(lm_folder)))
    files = sorted(p.name for p in saved.iterdir())
    assert files == ["config.json", "lm_tokenizer", "model.safetensors"]  # not the frozen LM
    assert set(load_file(saved / "model.safetensors")) == set(model.trainable_state_dict())
    loaded, tokenizer = load_pretrained(saved)
    assert isinstance(loaded, LMCaptioner) and isinstance(tokenizer, LMTokenizer)
    images, tokens = batch()
    with torch.no_grad():
        assert torch.equal(model(images, tokens)[0], loaded(images, tokens)[0])
    other = fused(lm_folder, every=1)  # a config that does not match the saved weights
    assert other.load_weights(saved / "model.safetensors")[0]
    written = json.loads((saved / "config.json").read_text())
    written["format_version"] = 1
    (saved / "config.json").write_text(json.dumps(written))
    with pytest.raises(CheckpointError, match="'format_version' is 1"):
        load_pretrained(saved)


def torch_load_calls(monkeypatch) -> list[bool | None]:
    """The `weights_only` of every torch.load call from now on."""
    calls, real_load = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.mark.parametrize("loader", [load_causal_lm, load_text_encoder])
def test_an_lm_with_only_pickle_weights_loads_only_if_allowed(
    loader, gpt2_folder, pickled_gpt2_folder, monkeypatch
):
    """An LM folder holding only pytorch_model.bin is refused, naming the file and the way
    in; allowed, it is read with weights_only and computes what the original does."""
    with pytest.raises(CheckpointError) as info:
        loader(str(pickled_gpt2_folder))
    message = str(info.value)
    assert str(pickled_gpt2_folder / "pytorch_model.bin") in message
    assert "pickle" in message and "--allow-pickle" in message
    calls = torch_load_calls(monkeypatch)
    allowed = loader(str(pickled_gpt2_folder), allow_pickle=True).eval()
    assert calls == [True]
    _, tokens = batch()
    with torch.no_grad():
        expected = loader(str(gpt2_folder)).eval()(input_ids=tokens)[0]
        assert torch.equal(allowed(input_ids=tokens)[0], expected)


def test_a_model_on_a_pickle_only_lm_loads_only_if_allowed(
    gpt2_folder, pickled_gpt2_folder, tmp_path
):
    """create_model and load_pretrained (a trained model naming the LM) pass allow_pickle on."""
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is a pickle file"):
        create_model(config(pickled_gpt2_folder))
    torch.manual_seed(1)
    model = create_model(config(pickled_gpt2_folder), allow_pickle=True).eval()
    images, tokens = batch()
    with torch.no_grad():
        assert torch.equal(model(images, tokens)[0], fused(gpt2_folder)(images, tokens)[0])
    model.save_pretrained(tmp_path / "saved", load_lm_tokenizer(str(pickled_gpt2_folder)))
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_pretrained(tmp_path / "saved")
    loaded, _ = load_pretrained(tmp_path / "saved", allow_pickle=True)
    with torch.no_grad():
        assert torch.equal(loaded(images, tokens)[0], model(images, tokens)[0])


class OfflineHub:
    """An Auto class whose hub repos have no safetensors weights, as transformers says."""

    @staticmethod
    def from_pretrained(name: str, use_safetensors: bool | None = None, **options):
        assert use_safetensors is True  # vtfuse asks for safetensors only
        raise OSError(f"{name} does not appear to have a file named model.safetensors")


def test_a_hub_model_with_only_pickle_weights_is_refused_naming_the_file(monkeypatch):
    import transformers.utils

    offered = {"pytorch_model.bin"}
    monkeypatch.setattr(transformers.utils, "has_file", lambda repo, name: name in offered)
    with pytest.raises(CheckpointError) as info:
        from_pretrained(OfflineHub, "someone/old-lm")
    assert "someone/old-lm/pytorch_model.bin is a pickle file" in str(info.value)
    assert "--allow-pickle" in str(info.value)
    offered.clear()  # no pickle either (or the hub cannot say): transformers' own error
    with pytest.raises(OSError, match=r"does not appear to have a file named model\.safetensors"):
        from_pretrained(OfflineHub, "someone/old-lm")


def test_packaged_minilm_becomes_a_decoder_with_a_new_head():
    """The real MiniLM-L6 (BERT) from its package, offline: causal, six wrapped layers, its
    encoder frozen, the LM head it never had trained from scratch."""
    torch.manual_seed(0)  # the same untrained head in both copies
    lm = load_causal_lm("minilm")
    assert lm.config.is_decoder and lm.name_or_path == "minilm"
    assert lm.new_weights and all(n.startswith("cls.") for n in lm.new_weights)
    torch.manual_seed(0)
    base = load_causal_lm("minilm").eval()
    model = LMCaptioner(config("minilm", every=3), lm=lm).eval()
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


def test_a_frozen_text_encoder_learns_to_answer_from_the_image(lm_folder):
    """VQA with the LM's body as the question encoder: zero gates leave its states as they
    were; training only the blocks, the vision encoder and the head, it learns to name the
    colour of the image, which the question alone cannot tell."""
    from transformers import AutoModel

    torch.manual_seed(0)
    settings = replace(config(lm_folder), task="vqa", num_answers=4)
    model = create_model(settings)
    assert isinstance(model, LMQuestionAnswerer)
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]])
    question = torch.tensor([[5, 6, 7, 8]]).repeat(8, 1)
    with torch.no_grad():
        base = AutoModel.from_pretrained(lm_folder).eval()
        model.eval()
        hidden = {}
        model.lm.register_forward_hook(lambda m, i, out: hidden.update(out=out.last_hidden_state))
        images = colours[torch.arange(8) % 4][:, :, None, None].expand(8, 3, 24, 24)
        model(images.to(torch.uint8), question)
        torch.testing.assert_close(hidden["out"], base(input_ids=question).last_hidden_state)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        answers = torch.randint(0, 4, (8,), generator=g)
        images = colours[answers][:, :, None, None].expand(8, 3, 24, 24).to(torch.uint8)
        batch = {"images": images, "tokens": question, "token_mask": question > 0}
        loss = model.training_loss({**batch, "answers": answers, "image_index": None})
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        images = colours[:, :, None, None].expand(4, 3, 24, 24).to(torch.uint8)
        logits, _ = model(images, question[:4])
    assert logits.argmax(-1).tolist() == [0, 1, 2, 3]
    for name, parameter in model.named_parameters():
        frozen = name.startswith("lm.") and ".fusion." not in name
        assert torch.equal(parameter, before[name]) == frozen, name


def test_vqa_warm_starts_its_blocks_from_a_captioner(lm_folder, tmp_path):
    """The blocks keep their layer across the LM's two wrappers (a decoder with a head, the
    bare encoder), so a captioner's fusion blocks start the question encoder's."""
    captioner = fused(lm_folder, gates=0.5)
    captioner.save_pretrained(tmp_path / "captioner", load_lm_tokenizer(str(lm_folder)))
    answerer = create_model(replace(config(lm_folder), task="vqa", num_answers=3))
    copied = warm_start(answerer, load_lm_tokenizer(str(lm_folder)), tmp_path / "captioner")
    blocks = [n for n in answerer.state_dict() if ".fusion." in n]
    assert copied.tensors >= len(blocks) > 0
    source = [t for n, t in captioner.state_dict().items() if ".fusion." in n]
    target = [answerer.state_dict()[n] for n in blocks]
    assert all(torch.equal(a, b) for a, b in zip(source, target, strict=True))


def test_a_resampler_before_the_blocks(lm_folder):
    """Flamingo's order: M latents read the image once, every block reads the latents; the
    zero-gate equality holds, maps still cover the image grid, and decoding is cached."""
    model = fused(lm_folder, resampler_latents=4)
    base = load_causal_lm(str(lm_folder)).eval()
    images, tokens = batch()
    with torch.no_grad():
        logits, _ = model(images, tokens)
        assert (logits - base(input_ids=tokens).logits).abs().max() <= 1e-6
    model = fused(lm_folder, gates=0.5, resampler_latents=4)
    assert model.encode_image(images).shape == (2, 4, VISION.dim)
    with torch.no_grad():
        _, weights = model(images, tokens, need_weights=True)
    grid = model.grid_size[0] * model.grid_size[1]
    assert weights[0].shape == (2, 2, tokens.shape[1], grid)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 2, tokens.shape[1]))
    generated = greedy(model, images, max_length=5, bos_id=BOS, eos_id=EOS, need_weights=True)
    assert generated.attention[0].shape[-1] == grid
    with torch.no_grad():
        prefix = torch.tensor([[BOS, *generated.tokens[0][:-1]]])
        assert model(images[:1], prefix)[0][0].argmax(-1).tolist() == generated.tokens[0]
