"""The joint model (ITC + ITM + LM, as ALBEF and BLIP): its loss is the weighted sum of the
single-task models' losses, each term trains only its parts, all three fall, it saves and loads
whole, and the command line trains, captions, retrieves and evaluates it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import require_module
from vtfuse.cli.main import main
from vtfuse.config import ModelConfig, TextConfig, VisionConfig
from vtfuse.data.items import pad_tokens
from vtfuse.data.tokenizer import Tokenizer
from vtfuse.models.captioner import Captioner
from vtfuse.models.factory import create_model, load_pretrained
from vtfuse.models.joint import JointModel, loss_weights
from vtfuse.models.retrieval import RetrievalModel
from vtfuse.pipeline import Pipeline

WORDS = Tokenizer.build(["red green blue yellow square circle"])
CONFIG = ModelConfig(
    task="joint",
    vision=VisionConfig(image_size=24, channels=(8, 8, 16), dim=32, depth=0, heads=2),
    text=TextConfig(vocab_size=len(WORDS), dim=32, depth=2, heads=2, max_length=16),
)
COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]])


def joint(seed: int = 0, **losses) -> JointModel:
    torch.manual_seed(seed)
    return create_model(_with(**losses))


def _with(**fields) -> ModelConfig:
    return replace(CONFIG, **fields)


def solid(colours: torch.Tensor) -> torch.Tensor:
    return colours[:, :, None, None].expand(-1, 3, 24, 24).to(torch.uint8).contiguous()


def batches(captions: list[str], owner: list[int]) -> tuple[dict, dict]:
    """The same captions as caption items (<bos> words <eos>, what the joint model reads) and
    as retrieval items (the words), each batch over the four colour images."""
    base = {"images": solid(COLOURS), "image_index": torch.tensor(owner)}
    caption, caption_mask = pad_tokens([WORDS.encode(c, bos=True, eos=True) for c in captions])
    words, words_mask = pad_tokens([WORDS.encode(c) for c in captions])
    return (
        {**base, "tokens": caption, "token_mask": caption_mask},
        {**base, "tokens": words, "token_mask": words_mask},
    )


CAPTIONS = ["red square", "red", "green circle", "blue square circle", "yellow", "yellow circle"]
OWNER = [0, 0, 1, 2, 3, 3]


def single_task_twins(model: JointModel) -> tuple[RetrievalModel, Captioner]:
    """A retrieval model and a captioner holding the joint model's weights: the encoder side
    under its own names, the decoder as the captioner's `text`."""
    weights = model.state_dict()
    retrieval = create_model(replace(CONFIG, task="retrieval"))
    missing, _ = retrieval.load_state_dict(weights, strict=False)
    assert not missing
    captioner = create_model(replace(CONFIG, task="caption"))
    renamed = {
        name.replace("decoder.", "text.", 1): tensor
        for name, tensor in weights.items()
        if not name.startswith("text.")
    }
    missing, _ = captioner.load_state_dict(renamed, strict=False)
    assert not missing
    return retrieval.eval(), captioner.eval()


def test_the_loss_is_the_weighted_sum_of_the_single_task_losses():
    m = joint(losses=("itc", "itm", "lm"), loss_weights=(1.0, 0.5, 2.0)).eval()
    caption_batch, retrieval_batch = batches(CAPTIONS, OWNER)
    retrieval, captioner = single_task_twins(m)
    with torch.no_grad():
        losses = m.training_losses(caption_batch)
        alone = retrieval.losses(retrieval_batch)  # eval mode: the hardest negatives, no draw
        lm = captioner.training_loss(caption_batch)
    torch.testing.assert_close(losses["loss_itc"], alone["itc"])
    torch.testing.assert_close(losses["loss_itm"], alone["itm"])
    torch.testing.assert_close(losses["loss_lm"], lm)
    total = alone["itc"] + 0.5 * alone["itm"] + 2.0 * lm
    torch.testing.assert_close(losses["loss"], total)
    torch.testing.assert_close(m.training_loss(caption_batch), total)
    metrics = m.validation_metrics(caption_batch)
    assert set(metrics) == {"loss", "itc", "itm", "lm"}
    assert metrics["loss"] == pytest.approx(total.item(), rel=1e-5)


def test_only_the_chosen_terms_are_computed_and_weighed():
    caption_batch, _ = batches(CAPTIONS, OWNER)
    m = joint(losses=("lm",)).eval()
    with torch.no_grad():
        losses = m.training_losses(caption_batch)
    assert set(losses) == {"loss", "loss_lm"}
    torch.testing.assert_close(losses["loss"], losses["loss_lm"])
    m = joint(losses=("itm", "itc"), loss_weights=(3.0, 0.0)).eval()
    with torch.no_grad():
        losses = m.training_losses(caption_batch)
    assert list(losses) == ["loss", "loss_itm", "loss_itc"]
    torch.testing.assert_close(losses["loss"], 3.0 * losses["loss_itm"])


def parts(m: JointModel) -> dict[str, set[int]]:
    """Parameter ids by part: the decoder's own (self-attention), the encoder's own, the
    shared text side, the ITC and ITM heads, the vision encoder."""

    def ids(module: torch.nn.Module) -> set[int]:
        return {id(p) for p in module.parameters()}

    decoder, encoder = ids(m.decoder), ids(m.text)
    return {
        "decoder only": decoder - encoder,
        "encoder only": encoder - decoder,
        "shared": decoder & encoder,
        "itc head": ids(m.image_projection) | ids(m.text_projection) | {id(m.logit_scale)},
        "itm head": ids(m.match_head),
        "vision": ids(m.vision),
    }


# per chosen term: the parts that must learn from it, and those that must get no gradient
ROUTES = {
    "itc": (
        {"encoder only", "shared", "itc head", "vision"},
        {"decoder only", "itm head"},
    ),
    "itm": (
        {"encoder only", "shared", "itm head", "vision"},
        {"decoder only", "itc head"},
    ),
    "lm": (
        {"decoder only", "shared", "vision"},
        {"encoder only", "itc head", "itm head"},
    ),
}


@pytest.mark.parametrize("term", sorted(ROUTES))
def test_each_term_reaches_its_parts_and_no_others(term):
    m = joint(losses=(term,)).train()
    caption_batch, _ = batches(CAPTIONS, OWNER)
    m.training_loss(caption_batch).backward()
    by_id = {id(p): p for p in m.parameters()}
    learns, untouched = ROUTES[term]
    groups = parts(m)
    for part in learns:
        assert any(
            by_id[i].grad is not None and by_id[i].grad.abs().sum() > 0 for i in groups[part]
        ), f"{term}: no gradient reaches the {part}"
    for part in untouched:
        assert all(by_id[i].grad is None or not by_id[i].grad.any() for i in groups[part]), (
            f"{term}: a gradient reaches the {part}"
        )
    assert m.leaves_parameters_unused


def test_what_is_shared_is_everything_but_self_attention():
    m = joint()
    assert m.decoder.token_embedding is m.text.token_embedding
    assert m.lm_head.weight is m.text.token_embedding.weight
    assert m.decoder.context is m.text.context and m.decoder.norm is m.text.norm
    for own, shared in zip(m.decoder.blocks, m.text.blocks, strict=True):
        assert own.fusion is shared.fusion and own.mlp is shared.mlp
        assert own.attn is not shared.attn and own.norm_attn is not shared.norm_attn
    names = {n for n, p in m.decoder.named_parameters() if id(p) in parts(m)["decoder only"]}
    assert names and all(".attn." in n or ".norm_attn." in n for n in names)
    assert not m.leaves_parameters_unused
    assert m.capabilities == ("caption", "retrieval")


def test_all_three_terms_fall():
    """Four colours, one caption each: the captions become predictable from the image, each
    retrieves its image, the matching head tells true pairs from the hardest false ones."""
    m = joint(seed=1).train()
    captions = ["red square", "green circle", "blue square", "yellow circle"]
    caption_batch, _ = batches(captions, [0, 1, 2, 3])
    optimiser = torch.optim.AdamW(m.parameters(), lr=3e-3)
    m.eval()
    first = m.validation_metrics(caption_batch)
    m.train()
    for _ in range(100):
        loss = m.training_loss(caption_batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    m.eval()
    last = m.validation_metrics(caption_batch)
    for term in ("itc", "itm", "lm", "loss"):
        assert last[term] < first[term] / 3, (term, first[term], last[term])
    pipe = Pipeline(m, WORDS, torch.device("cpu"))
    assert pipe.caption([_picture(c) for c in COLOURS]) == captions
    assert pipe.retrieve_images("yellow circle", [_picture(c) for c in COLOURS])[0][0] == 3


def _picture(colour: torch.Tensor):
    from PIL import Image

    return Image.new("RGB", (24, 24), tuple(colour.tolist()))


def test_save_and_load_give_the_same_model(tmp_path):
    m = joint(seed=2, losses=("itc", "lm"), loss_weights=(0.5, 1.0)).eval()
    m.save_pretrained(tmp_path / "model", WORDS)
    loaded, tokenizer = load_pretrained(tmp_path / "model")
    assert isinstance(loaded, JointModel) and loaded.weights == {"itc": 0.5, "lm": 1.0}
    own, back = m.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["model"]
    assert saved["losses"] == ["itc", "lm"] and saved["loss_weights"] == [0.5, 1.0]
    stored = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert "decoder.blocks.0.attn.to_q.weight" in stored  # the decoder's own, once each
    assert not any(name.startswith("decoder.token_embedding") for name in stored)
    caption_batch, _ = batches(CAPTIONS, OWNER)
    with torch.no_grad():
        torch.testing.assert_close(
            m.training_losses(caption_batch), loaded.training_losses(caption_batch), rtol=0, atol=0
        )
    a = Pipeline(m, WORDS, torch.device("cpu")).generate(solid(COLOURS)).tokens
    b = Pipeline(loaded, tokenizer, torch.device("cpu")).generate(solid(COLOURS)).tokens
    assert a == b


def test_loss_terms_are_checked():
    assert loss_weights((), ()) == {"itc": 1.0, "itm": 1.0, "lm": 1.0}
    assert loss_weights(("lm",), ()) == {"lm": 1.0}
    with pytest.raises(ValueError, match=r"unknown loss term.*'mlm'.*choose among: itc, itm, lm"):
        loss_weights(("itc", "mlm"), ())
    with pytest.raises(ValueError, match=r"2 loss weight.*3 loss term"):
        loss_weights(("itc", "itm", "lm"), (1.0, 2.0))
    with pytest.raises(ValueError, match="more than once"):
        loss_weights(("lm", "lm"), ())
    for bad in ((-1.0,), (float("nan"),), (0.0,)):
        with pytest.raises(ValueError, match="finite, >= 0 and not all 0"):
            loss_weights(("lm",), bad)
    with pytest.raises(ValueError, match="task 'caption' has its own loss"):
        create_model(_with(task="caption", losses=("lm",)))


def test_loss_flags_are_checked(tmp_path, capsys):
    base = ["train", "--train", "t.jsonl", "--out", str(tmp_path / "run")]
    assert main([*base, "--losses", "itc,bogus"]) == 2
    assert "choose among: itc, itm, lm" in capsys.readouterr().err
    assert main([*base, "--losses", "itc,itm,lm", "--loss-weights", "1,1"]) == 2
    assert "give one weight per term" in capsys.readouterr().err
    assert main([*base, "--task", "caption", "--losses", "lm"]) == 2
    assert "use --task joint" in capsys.readouterr().err
    assert main([*base, "--task", "joint", "--loss-weights", "1,1,1"]) == 2
    assert "--loss-weights needs --losses" in capsys.readouterr().err
    assert main(base) == 2
    assert "give --task" in capsys.readouterr().err


def test_joint_training_through_the_command_line(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--images", "30", "--size", "24"]) == 0
    vision = {"image_size": 24, "channels": [8, 8, 16], "dim": 32, "depth": 0, "heads": 2}
    text = {"dim": 32, "depth": 1, "heads": 2, "max_length": 48}
    # 24 training scenes, two captions each: 6 steps an epoch, a step line at step 50
    tiny = {"model": {"vision": vision, "text": text}, "train": {"epochs": 9, "batch_size": 8}}
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    run = tmp_path / "run"
    args = ["train", "--losses", "itc,itm,lm", "--loss-weights", "1,0.5,1"]
    args += ["--train", str(data / "caption_train.jsonl"), "--val", str(data / "caption_val.jsonl")]
    args += ["--out", str(run), "--config", str(tmp_path / "tiny.json"), "--no-progress"]
    assert main(args) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [entry for entry in log if "loss" in entry]
    epochs = [entry for entry in log if "train_loss" in entry]
    assert steps and epochs, "a step line (every 50 steps) and the epoch lines"
    for entry in steps:
        assert {"loss_itc", "loss_itm", "loss_lm"} <= set(entry)
        weighted = entry["loss_itc"] + 0.5 * entry["loss_itm"] + entry["loss_lm"]
        assert entry["loss"] == pytest.approx(weighted, rel=1e-5)
    for entry in epochs:
        assert {"train_loss_itc", "train_loss_itm", "train_loss_lm"} <= set(entry)
        assert {"val_loss", "val_itc", "val_itm", "val_lm"} <= set(entry)
    run_file = json.loads((run / "run.json").read_text())
    assert run_file["task"] == "joint" and run_file["model"]["loss_weights"] == [1.0, 0.5, 1.0]
    capsys.readouterr()

    image = str(next((data / "images").glob("*.png")))
    assert main(["caption", str(run), image]) == 0
    assert capsys.readouterr().out.startswith(image + "\t")
    assert main(["retrieve", str(run), "--query", "a red circle", "--images", str(data / "images"),
                 "--top-k", "3"]) == 0  # fmt: skip
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    metrics_file, predictions = tmp_path / "metrics.json", tmp_path / "predictions.jsonl"
    test = str(data / "caption_test.jsonl")
    evaluation = ["eval", str(run), "--data", test, "--metrics", str(metrics_file)]
    assert main([*evaluation, "--predictions", str(predictions), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "caption/cider" in table and "retrieval/i2t_r1" in table
    metrics = json.loads(metrics_file.read_text())
    for key in ("cider", "bleu4", "object_f1"):
        assert key in metrics["caption"]
    for key in ("i2t_r1", "t2i_r1", "itm_i2t_r1", "itm_t2i_r1"):
        assert 0 <= metrics["retrieval"][key] <= 1
    lines = predictions.read_text().splitlines()
    assert metrics["examples"] == len(lines) == len(Path(test).read_text().splitlines()) > 0
    assert set(json.loads(lines[0])["prediction"]) == {"caption", "retrieval"}


def test_the_server_captions_and_retrieves_with_a_joint_model():
    require_module("fastapi")
    import io

    from fastapi.testclient import TestClient

    from vtfuse.serving import create_app

    def png(colour: torch.Tensor) -> tuple[str, bytes, str]:
        buffer = io.BytesIO()
        _picture(colour).save(buffer, format="PNG")
        return ("a.png", buffer.getvalue(), "image/png")

    with TestClient(create_app(Pipeline(joint(), WORDS, torch.device("cpu")))) as client:
        info = client.get("/v1/model").json()
        assert info["task"] == "joint" and info["capabilities"] == ["caption", "retrieval"]
        out = client.post("/v1/caption", files={"image": png(COLOURS[0])})
        assert out.status_code == 200 and isinstance(out.json()["caption"], str)
        images = [("images", png(c)) for c in COLOURS[:2]]
        out = client.post("/v1/retrieve", files=images, data={"query": "red", "top_k": "1"})
        assert out.status_code == 200 and len(out.json()["results"]) == 1
        out = client.post("/v1/ask", files={"image": png(COLOURS[0])}, data={"question": "red?"})
        assert out.status_code == 422 and "'joint' model" in out.json()["error"]
