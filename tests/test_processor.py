"""What the kit writes loads in plain transformers: the processor files travel into adapter/, merged and exported
outputs, and the inputs transformers' processing builds from them run the merged model as the kit's adapter model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_sft import sft_config
from transformers import AutoTokenizer, InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from ivl.cli import main as cli_main
from ivl.finetune.sft import run_sft
from ivl.image import image_to_pixel_values
from ivl.model.adapters import load_trained, merge_adapter
from ivl.model.load import ModelConfig, save_checkpoint
from ivl.model.processor import save_processor

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]


def write_picture(path):
    """A 224 x 112 picture: a 2 x 1 grid of 112 px tiles + the thumbnail."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(112, 224, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return Image.open(path)


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """(adapter, merged) of a 1-step LoRA run tiling up to 4 tiles + thumbnail, and a picture to ask about."""
    root = tmp_path_factory.mktemp("processor")
    result = run_sft(sft_config(shapes, root / "run", "loop.max_steps=1", "data.max_tiles=4",
                                "data.use_thumbnail=true"))  # fmt: skip
    merged, notes = merge_adapter(result.output, root / "merged")
    assert notes == []
    return Path(result.output), merged, write_picture(root / "picture.png")


def plain_inputs(merged: Path, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, pixel_values) from the files in `merged` alone, as InternVLProcessor builds them, by hand:
    transformers' image processor (its PIL backend without torchvision), the chat template, and each image token
    expanded to <img> + image_seq_length x <IMG_CONTEXT> per tile + </img>."""
    pixel_values = GotOcr2ImageProcessorPil.from_pretrained(merged)(images=[image], return_tensors="pt")["pixel_values"]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    seq_length = json.loads((merged / "processor_config.json").read_text())["image_seq_length"]
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    prompt = prompt.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * seq_length * len(pixel_values) + "</img>")
    return tokenizer(prompt, return_tensors="pt")["input_ids"], pixel_values


def test_merged_model_runs_on_inputs_built_from_its_own_processor_files(trained):
    adapter, merged, image = trained
    for directory in (adapter, merged):
        assert {"preprocessor_config.json", "processor_config.json", "chat_template.jinja"} <= {
            path.name for path in directory.iterdir()
        }
    input_ids, pixel_values = plain_inputs(merged, image)
    ours = image_to_pixel_values(image, max_tiles=4, tile_size=112)  # how training tiled it
    assert pixel_values.shape == ours.shape == (3, 3, 112, 112)
    torch.testing.assert_close(pixel_values, ours, atol=0.04, rtol=0)  # +-2 levels of resize rounding, / std
    model = InternVLForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
    adapter_model, _, _ = load_trained(adapter)
    with torch.no_grad():  # the model refuses image tokens that do not match the image features' count
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        expected = adapter_model(input_ids=input_ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_auto_processor_builds_the_same_inputs_where_torchvision_is_installed(trained):
    pytest.importorskip("torchvision")  # transformers' InternVLProcessor cannot be built without it
    from transformers import AutoProcessor

    _, merged, image = trained
    processor = AutoProcessor.from_pretrained(merged)
    text = processor.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    input_ids, pixel_values = plain_inputs(merged, image)
    assert torch.equal(inputs["input_ids"], input_ids)
    torch.testing.assert_close(inputs["pixel_values"], pixel_values, atol=0.04, rtol=0)  # torchvision's resize


def test_merge_to_original_names_the_missing_remote_code_in_one_line(trained, tmp_path, capsys):
    adapter, _, _ = trained  # a preset's: no remote code to carry
    assert cli_main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "original"), "--format",
                     "original"]) == 0  # fmt: skip
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "modeling_internvl_chat.py" in notes[0]


def test_a_bases_own_processor_files_are_carried_and_geometry_fills_the_gaps(tmp_path):
    from ivl.model.load import load_model

    model, tokenizer = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    base = save_checkpoint(model, tokenizer, tmp_path / "base")
    own = {"image_processor_type": "GotOcr2ImageProcessor", "size": {"height": 112, "width": 112}, "max_patches": 3,
           "crop_to_patches": True}  # fmt: skip
    (base / "preprocessor_config.json").write_text(json.dumps(own))
    out = tmp_path / "out"
    out.mkdir()
    save_processor(out, ModelConfig(name_or_path=str(base)), model.config)
    assert json.loads((out / "preprocessor_config.json").read_text()) == own  # the base's, unchanged
    vision = model.config.vision_config  # tiles of image_size px in patch_size px patches, pixel-shuffled
    patches = (vision.image_size[0] // vision.patch_size[0]) ** 2
    seq_length = json.loads((out / "processor_config.json").read_text())["image_seq_length"]
    assert seq_length == patches * model.config.downsample_ratio**2 == 16
