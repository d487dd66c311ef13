"""Conversations -> tensors: image expansion, label masking, templates, formats, batches (docs/design/prompt_layout.md,
docs/guides/data.md)."""

import json
import re
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from ivl.data.chat import IGNORE_INDEX, SampleError
from ivl.data.packed_loader import StreamingSource
from ivl.data.records import DataSource, Record, read_meta
from ivl.data.samples import (
    DataConfig,
    SampleBuilder,
    SFTDataset,
    collate,
    load_records,
    model_inputs,
)
from ivl.model.load import ModelConfig, load_model
from ivl.model.presets import load_demo_tokenizer, preset_config


@pytest.fixture(scope="module")
def tokenizer():
    return load_demo_tokenizer()


@pytest.fixture(scope="module")
def model_config(tokenizer):
    return preset_config("tiny-112", tokenizer)  # 112 px tiles, 16 tokens per tile


def make_image(tmp_path, name, size, seed=0):
    rng = np.random.default_rng(seed)
    path = tmp_path / name
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def record(row, root):
    return Record("test.jsonl:1", row, DataSource("test", "test.jsonl", root))


def supervised_text(tokenizer, sample):
    labels = sample["labels"]
    return tokenizer.decode(labels[labels != IGNORE_INDEX])


def test_only_assistant_tokens_and_their_end_token_are_supervised(tokenizer, model_config, tmp_path):
    make_image(tmp_path, "a.png", (224, 112))
    row = {
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the circle?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "And the square?"},
            {"from": "gpt", "value": "blue square"},
        ],
    }
    builder = SampleBuilder(tokenizer, model_config, DataConfig(template="tokenizer"))
    sample = builder.build(record(row, tmp_path))
    assert supervised_text(tokenizer, sample) == "red<|im_end|>blue square<|im_end|>"
    # Exactly the supervised positions: each reply's tokens plus <|im_end|>, contiguous per turn.
    ids, labels = sample["input_ids"], sample["labels"]
    supervised = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for position in supervised:
        assert labels[position] == ids[position]
    assert [ids[p].item() for p in supervised].count(end_id) == 2
    # The header "<|im_start|>assistant\n" and the "\n" after <|im_end|> stay masked.
    assert tokenizer.decode(ids[supervised[0] - 3 : supervised[0]]) == "<|im_start|>assistant\n"
    assert labels[supervised[-1] + 1] == IGNORE_INDEX


def test_image_token_count_equals_tokens_per_tile_times_tiles_for_every_image(tokenizer, model_config, tmp_path):
    make_image(tmp_path, "wide.png", (448, 112), seed=1)
    make_image(tmp_path, "square.png", (112, 112), seed=2)
    row = {
        "image": ["wide.png", "square.png"],
        "conversations": [
            {"from": "human", "value": "<image>\nleft <image>\nright: same?"},
            {"from": "gpt", "value": "no"},
        ],
    }
    builder = SampleBuilder(tokenizer, model_config, DataConfig(max_tiles=12))
    sample = builder.build(record(row, tmp_path))
    measured = builder.measure(record(row, tmp_path))  # what `ivl data check` counts without tiling
    assert (measured["num_tokens"], measured["num_tiles"]) == (len(sample["input_ids"]), 6)
    # Budget 12 split over 2 images -> 6 each: the 4:1 image gets a 4x1 grid + thumbnail, the square one 1 tile.
    assert sample["num_tiles"] == [5, 1]
    assert sample["tiles"].shape == (6, 3, 112, 112) and sample["tiles"].dtype == torch.uint8
    ids = sample["input_ids"].tolist()
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    start, end = tokenizer.convert_tokens_to_ids("<img>"), tokenizer.convert_tokens_to_ids("</img>")
    runs = [
        ids[s + 1 : e].count(context)
        for s, e in zip(
            [i for i, t in enumerate(ids) if t == start], [i for i, t in enumerate(ids) if t == end], strict=True
        )
    ]
    assert runs == [16 * 5, 16 * 1]
    assert ids.count(context) == 16 * 6
    assert (sample["labels"][torch.tensor(ids) == context] == IGNORE_INDEX).all()


def test_training_ids_equal_transformers_internvl_processor_ids(tokenizer, model_config, tmp_path, monkeypatch):
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    image_path = make_image(tmp_path, "p.png", (300, 180), seed=3)
    image_processor = GotOcr2ImageProcessorPil(
        crop_to_patches=True, max_patches=6, size={"height": 112, "width": 112},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )  # fmt: skip
    # Its class check looks up the video processor registry, which needs torchvision (absent here): skip only that.
    monkeypatch.setattr(InternVLProcessor, "check_argument_for_proper_class", lambda *args: None)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=16)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = processor(text=prompt + "circle<|im_end|>\n", images=Image.open(image_path), return_tensors="pt")

    row = {"messages": [*messages, {"role": "assistant", "content": "circle"}], "images": ["p.png"]}
    sample = SampleBuilder(tokenizer, model_config, DataConfig(max_tiles=6)).build(record(row, tmp_path))
    assert sample["input_ids"].tolist() == expected["input_ids"][0].tolist()
    batch = collate([sample], tokenizer.pad_token_id)
    torch.testing.assert_close(model_inputs(batch)["pixel_values"], expected["pixel_values"], atol=0.1, rtol=0)


def test_named_template_adds_its_default_system_prompt(tokenizer, model_config):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    builder = SampleBuilder(tokenizer, model_config, DataConfig(template="internvl2_5"))
    sample = builder.build(record(row, "."))
    text = tokenizer.decode(sample["input_ids"])
    assert text.startswith("<|im_start|>system\n你是书生·万象")
    assert supervised_text(tokenizer, sample) == "hello<|im_end|>"
    assert sample["tiles"] is None and sample["num_tiles"] == []
    with_system = {**row, "system": "Be brief."}
    text = tokenizer.decode(builder.build(record(with_system, "."))["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "书生" not in text


def test_image_without_placeholder_gets_one_prepended(tokenizer, model_config, tmp_path):
    make_image(tmp_path, "a.png", (112, 112))
    row = {"image": "a.png", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    sample = SampleBuilder(tokenizer, model_config, DataConfig()).build(record(row, tmp_path))
    assert "<|im_start|>user\n<img>" in tokenizer.decode(sample["input_ids"])


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"image": ["a.png", "a.png"], "conversations": [
            {"from": "human", "value": "<image> only one"}, {"from": "gpt", "value": "A"}]},
         "1 <image> placeholder(s) but 2 image(s)"),
        ({"conversations": [{"from": "human", "value": "Q"}]}, "no assistant turn"),
        ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}]}, "empty assistant"),
        ({"conversations": [{"from": "human", "value": "see <IMG_CONTEXT>"}, {"from": "gpt", "value": "A"}]},
         "reserved image marker"),
        ({"conversations": [{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}]}, "unknown role"),
        ({"text": "no conversation"}, "no 'conversations'"),
    ],
)  # fmt: skip
def test_bad_rows_raise_sample_errors_that_say_why(tokenizer, model_config, tmp_path, row, reason):
    make_image(tmp_path, "a.png", (112, 112))
    with pytest.raises(SampleError, match=re.escape(reason)):
        SampleBuilder(tokenizer, model_config, DataConfig()).build(record(row, tmp_path))


def test_over_long_samples_are_refused_not_truncated(tokenizer, model_config, tmp_path):
    make_image(tmp_path, "big.png", (896, 448))
    row = {"image": "big.png", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    builder = SampleBuilder(tokenizer, model_config, DataConfig(max_length=48))
    with pytest.raises(SampleError, match="over max_length 48"):
        builder.build(record(row, tmp_path))
    with pytest.raises(SampleError, match="over max_length 48"):
        builder.measure(record(row, tmp_path))


def test_video_frames_become_one_tile_each_with_frame_prefixes(tokenizer, model_config, tmp_path):
    frames = tmp_path / "clip"
    frames.mkdir()
    for i in range(12):
        make_image(frames, f"{i:03d}.png", (160, 120), seed=i)
    row = {"video": "clip", "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                               {"from": "gpt", "value": "nothing"}]}  # fmt: skip
    sample = SampleBuilder(tokenizer, model_config, DataConfig(num_video_frames=4)).build(record(row, tmp_path))
    assert sample["num_tiles"] == [1, 1, 1, 1]
    assert sample["tiles"].shape == (4, 3, 112, 112)
    text = tokenizer.decode(sample["input_ids"])
    assert "Frame1: <img>" in text and "Frame4: <img>" in text and "Frame5" not in text


def test_meta_file_repeat_time_and_max_dynamic_patch(tokenizer, model_config, tmp_path):
    make_image(tmp_path, "wide.png", (1344, 112))
    rows = [{"image": "wide.png", "conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": "A"}]}
            for i in range(10)]  # fmt: skip
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"a": {"root": str(tmp_path), "annotation": "a.jsonl", "repeat_time": 2.5, "max_dynamic_patch": 3},
            "b": {"root": str(tmp_path), "annotation": "a.jsonl", "repeat_time": 0.3}}  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    sources = read_meta(tmp_path / "meta.json")
    assert [s.max_tiles for s in sources] == [3, None]
    records = load_records(tmp_path / "meta.json")
    assert len(records) == 25 + 3
    builder = SampleBuilder(tokenizer, model_config, DataConfig(max_tiles=12))
    assert builder.build(records[0])["num_tiles"] == [4]  # 3x1 grid under the meta's budget of 3, + thumbnail
    assert builder.build(records[-1])["num_tiles"] == [13]  # 12x1 grid + thumbnail under the config's 12


def test_mixed_text_and_image_batch_runs_through_the_model(tokenizer, tmp_path):
    model, _ = load_model(ModelConfig(name_or_path="preset:tiny-112"))
    make_image(tmp_path, "a.png", (224, 112))
    rows = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "yes"}]},
        {"image": "missing.png", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    ]
    builder = SampleBuilder(tokenizer, model.config, DataConfig(on_error="skip"))
    dataset = SFTDataset([record(row, tmp_path) for row in rows], builder)
    batch = collate([dataset[i] for i in range(3)], tokenizer.pad_token_id)
    assert batch["num_skipped"] == 1 and batch["input_ids"].shape[0] == 2
    assert batch["tiles"].shape[0] == 3  # 2x1 grid + thumbnail, text-only sample adds none
    output = model(**model_inputs(batch))
    assert torch.isfinite(output.loss)
    strict = SFTDataset(dataset.records, SampleBuilder(tokenizer, model.config, DataConfig(on_error="fail")))
    with pytest.raises(SampleError, match=r"test.jsonl:1: image not found"):
        strict[2]


def test_saved_hf_dataset_in_trl_layout_and_streaming(tokenizer, model_config, tmp_path):
    import datasets

    make_image(tmp_path, "a.png", (224, 112))
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Q{i}"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": f"answer {i}"}]}],
         "images": [str(tmp_path / "a.png")]}
        for i in range(5)
    ]  # fmt: skip
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    builder = SampleBuilder(tokenizer, model_config, DataConfig())
    records = load_records(tmp_path / "saved")
    assert [r.location for r in records][:2] == [f"{tmp_path / 'saved'}[0]", f"{tmp_path / 'saved'}[1]"]
    mapped = [SFTDataset(records, builder)[i] for i in range(5)]
    assert supervised_text(tokenizer, mapped[3]) == "answer 3<|im_end|>"

    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stream = iter(StreamingSource(tmp_path / "rows.jsonl", builder))  # endless: one pass is the first 5 samples
    streamed = [sample for _, sample in islice(stream, 5)]
    for ours, theirs in zip(streamed, mapped, strict=True):
        assert torch.equal(ours["input_ids"], theirs["input_ids"]) and torch.equal(ours["tiles"], theirs["tiles"])
