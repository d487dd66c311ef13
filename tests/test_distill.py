"""Vision-encoder distillation on tiny ViTs: CLIP -> student mapping, teacher loading in every layout, losses, the
recipe online / offline / resumed, the feature cache, evaluation and export."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    InternVLForConditionalGeneration,
    InternVLVisionModel,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

import ivl.distill.train
from ivl.config import ConfigError, load_config
from ivl.data.shapes import write_dataset
from ivl.distill.cache import CachedTiles, kept_tokens
from ivl.distill.cli import main as distill_main
from ivl.distill.clip_init import CLIP_LAYER_ROLES, clip_pixel_stats, clip_to_internvit, pre_layernorm_sigma
from ivl.distill.commands import run_cache, run_eval
from ivl.distill.data import DistillDataConfig, TileDataset, list_images
from ivl.distill.evaluate import knn_accuracy, linear_probe_accuracy
from ivl.distill.export import place_into_internvl
from ivl.distill.losses import LossConfig, distill_loss
from ivl.distill.models import CLIP_PRESETS, build_vision_model, hidden_states, vision_config, vision_name
from ivl.distill.student import StudentConfig, build_student
from ivl.distill.teacher import TeacherConfig, load_teacher, load_vision_checkpoint
from ivl.distill.train import DistillConfig, run_distill
from ivl.finetune.sft import SFTConfig, run_sft
from ivl.image import normalize
from ivl.model.convert import convert_checkpoint
from ivl.model.load import ModelConfig, load_model, save_checkpoint
from ivl.model.parts import model_parts, part_of
from ivl.runtime import read_metrics
from tests.helpers import torchrun

TILE = 112


def tiles(count: int = 8) -> torch.Tensor:
    data = DistillDataConfig(train="shapes:train", max_images=count, shapes_size=TILE)
    dataset = TileDataset(list_images(data.train, count), TILE, data)
    return torch.stack([dataset[i]["pixels"] for i in range(count)])


def tiny_clip(layers: int = 2) -> CLIPVisionModel:
    """A random tiny CLIP whose pre-LayerNorm is not the identity (so folding it is visible)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = CLIPVisionModel(CLIPVisionConfig(**{**CLIP_PRESETS["tiny-clip"], "num_hidden_layers": layers})).eval()
        with torch.no_grad():
            clip.pre_layrnorm.weight.copy_(1 + 0.5 * torch.randn(32))
            clip.pre_layrnorm.bias.copy_(0.3 * torch.randn(32))
    return clip


# --- CLIP -> student ------------------------------------------------------------------------------------------------


def test_clip_mapping_puts_every_tensor_where_expected():
    clip = tiny_clip(layers=3)  # deeper than the student: its first two layers are used
    student_config = vision_config("tiny-student")
    mean, std = clip_pixel_stats("preset:tiny-clip")
    state = clip_to_internvit(clip, student_config, mean, std, pre_layernorm_scale=None)
    student = InternVLVisionModel(student_config)
    assert set(state) == set(student.state_dict())  # every student tensor is given, nothing else
    clip_state = clip.state_dict()
    for i in range(2):
        for clip_role, role in CLIP_LAYER_ROLES.items():
            for suffix in ("weight", "bias"):
                expected = clip_state[f"encoder.layers.{i}.{clip_role}.{suffix}"]
                assert torch.equal(state[f"{vision_name(role, i)}.{suffix}"], expected), (i, clip_role)
        assert torch.equal(state[vision_name("vision.scale1", i)], torch.ones(32))
    assert torch.equal(state[vision_name("vision.cls")].flatten(), clip_state["embeddings.class_embedding"])
    assert state[vision_name("vision.position")].shape == (1, 8 * 8 + 1, 32)  # 4 x 4 + 1 -> 8 x 8 + 1
    assert torch.equal(
        state[vision_name("vision.position")][0, 0], clip_state["embeddings.position_embedding.weight"][0]
    )
    with pytest.raises(ConfigError, match="hidden_size"):
        clip_to_internvit(clip, vision_config("tiny-teacher"), mean, std, None)


@pytest.mark.parametrize("pre_layernorm", ["drop", "fold"])
def test_patch_embedding_fold_is_exact(pre_layernorm):
    """Student on ImageNet-normalised pixels == CLIP's embeddings on CLIP-normalised pixels (positions interpolated
    to the student's grid the way transformers does); with `fold`, == the pre-LayerNorm with one constant sigma."""
    clip, pixels = tiny_clip(), tiles()
    mean, std = clip_pixel_stats("preset:tiny-clip")
    sigma = pre_layernorm_sigma(clip, pixels, mean, std) if pre_layernorm == "fold" else None
    student = InternVLVisionModel(vision_config("tiny-student"))
    student.load_state_dict(clip_to_internvit(clip, student.config, mean, std, sigma))
    with torch.no_grad():
        ours = student.embeddings(normalize(pixels))
        theirs = clip.embeddings(normalize(pixels, mean, std), interpolate_pos_encoding=True)
        if sigma is not None:
            ln = clip.pre_layrnorm
            theirs = ln.weight * (theirs - theirs.mean(-1, keepdim=True)) / sigma + ln.bias
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_clip_init_reports_its_cosine_to_clip_and_folding_beats_dropping():
    pixels = tiles(16)
    config = dict(preset="tiny-student", init="clip", clip="preset:tiny-clip")
    reports = {}
    for mode in ("fold", "drop"):
        student, reports[mode] = build_student(StudentConfig(**config, pre_layernorm=mode), pixels)
    assert reports["fold"]["cosine_to_clip"] > reports["drop"]["cosine_to_clip"]
    assert 0.95 < reports["fold"]["cosine_to_clip"] <= 1.0
    with pytest.raises(ConfigError, match="init=clip needs clip"):
        load_config(StudentConfig, None, ["init=clip"])


# --- teacher ----------------------------------------------------------------------------------------------------------


def test_teacher_loads_the_same_vit_from_every_checkpoint_layout(tmp_path):
    model, tokenizer = load_model(ModelConfig(name_or_path="preset:tiny-6b-style", dtype="float32"))
    reference = model_parts(model).vision
    save_checkpoint(model, tokenizer, tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "original", to="original")
    reference.save_pretrained(tmp_path / "hf-vit")
    # A standalone original InternViT (InternViT-6B-448px-V2_5's layout): the ViT's names without `vision_model.`.
    original = {k: v for f in (tmp_path / "original").glob("*.safetensors") for k, v in load_file(f).items()}
    (tmp_path / "original-vit").mkdir()
    save_file({k[len("vision_model.") :]: v for k, v in original.items() if k.startswith("vision_model.")},
              tmp_path / "original-vit" / "model.safetensors")  # fmt: skip
    vision = json.loads((tmp_path / "original" / "config.json").read_text())["vision_config"]
    (tmp_path / "original-vit" / "config.json").write_text(
        json.dumps({**vision, "architectures": ["InternVisionModel"]})
    )
    pixels = normalize(tiles(2))
    expected = hidden_states(reference, pixels, [1])[1]
    for layout in ("hf", "original", "hf-vit", "original-vit"):
        teacher = load_vision_checkpoint(tmp_path / layout, torch.float32)
        assert torch.allclose(hidden_states(teacher, pixels, [1])[1], expected, atol=1e-5), layout


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_teacher_loads_the_vit_of_internvl35_checkpoints(tmp_path, family):
    """InternVL3.5-38B's InternViT-6B as a teacher: a tiny 3.5-shaped checkpoint (6B-style ViT: RMSNorm, QK-norm, no
    qkv bias; Qwen3 / Qwen3-MoE LLM) saved by plain transformers, and its original-layout conversion."""
    from test_convert_35 import _tiny_35_config

    from ivl.model.presets import load_demo_tokenizer

    tokenizer = load_demo_tokenizer()
    config = _tiny_35_config(tokenizer, family)
    config.vision_config.norm_type, config.vision_config.use_qk_norm = "rms_norm", True
    config.vision_config.attention_bias = False
    model = InternVLForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "original", to="original")
    assert json.loads((tmp_path / "original" / "config.json").read_text())["vision_config"]["qk_normalization"]
    pixels = normalize(tiles(2))
    expected = hidden_states(model_parts(model).vision, pixels, [1])[1]
    for layout in ("hf", "original"):
        teacher = load_teacher(TeacherConfig(name_or_path=str(tmp_path / layout), dtype="float32"), "cpu")
        assert teacher.config.use_qk_norm and teacher.config.norm_type == "rms_norm"
        assert torch.allclose(hidden_states(teacher, pixels, [1])[1], expected, atol=1e-5), layout


def test_int8_teacher_is_close_to_the_full_precision_one():
    pytest.importorskip("bitsandbytes")
    from ivl.distill.int8 import teacher_fidelity

    reference = load_teacher(TeacherConfig(dtype="float32"), "cpu")
    quantized = load_teacher(TeacherConfig(dtype="float32", quantize="int8"), "cpu")
    assert quantized.get_submodule(vision_name("vision.q", 0)).weight.dtype == torch.int8
    fidelity = teacher_fidelity(reference, quantized, normalize(tiles(4)), [0, 3])
    assert all(0.99 < cosine < 1.0 for cosine in fidelity.values()), fidelity


# --- losses -----------------------------------------------------------------------------------------------------------


def test_loss_is_zero_on_a_match_and_weights_patch_and_cls_separately():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 8, generator=generator)
    target = [{"patch": student[:, 1:].clone(), "cls": -student[:, 0]}]  # patches match, CLS is opposite
    cls_only = load_config(LossConfig, None, ["patch_weight=0"])
    patch_only = load_config(LossConfig, None, ["cls_weight=0"])
    assert torch.allclose(distill_loss([student], target, None, patch_only), torch.zeros(2), atol=1e-6)
    assert torch.allclose(distill_loss([student], target, None, cls_only), torch.full((2,), 2.0), atol=1e-6)
    index = torch.tensor([[0, 3], [1, 2]])  # subsampled targets hold only these patch tokens
    picked = [{"patch": student[:, 1:].gather(1, index.unsqueeze(-1).expand(-1, -1, 8)), "cls": student[:, 0]}]
    assert torch.allclose(distill_loss([student], picked, index, LossConfig()), torch.zeros(2), atol=1e-6)
    smooth_l1 = load_config(LossConfig, None, ["cosine_weight=0", "smooth_l1_weight=1"])
    scaled = [{"patch": 2 * student[:, 1:], "cls": 2 * student[:, 0]}]  # same direction: cosine 0, smooth-L1 not
    assert torch.allclose(distill_loss([student], scaled, None, LossConfig()), torch.zeros(2), atol=1e-6)
    assert (distill_loss([student], scaled, None, smooth_l1) > 0.1).all()
    assert LossConfig(last_k=2).layer_pairs(2, 4) == [(0, 2), (1, 3)]
    with pytest.raises(ConfigError, match="layer 5"):
        LossConfig(pairs=[[0, 5]]).layer_pairs(2, 4)


def test_loss_equals_the_restated_formula_averaged_over_layer_pairs():
    """Per tile: sum over distances d of w_d * (patch_weight * mean_t d(s_t, t_t) + cls_weight * d(s_cls, t_cls)),
    then the mean over layer pairs; cosine d = 1 - cos, smooth-L1 d = mean over dims of 0.5 x^2 / beta where
    |x| < beta, else |x| - beta / 2."""
    generator = torch.Generator().manual_seed(1)
    states = [torch.randn(3, 5, 8, generator=generator) for _ in range(2)]
    targets = [{"patch": torch.randn(3, 4, 8, generator=generator), "cls": torch.randn(3, 8, generator=generator)}
               for _ in range(2)]  # fmt: skip
    config = load_config(LossConfig, None, ["cosine_weight=0.7", "smooth_l1_weight=0.3", "smooth_l1_beta=0.5",
                                            "patch_weight=1.5", "cls_weight=0.25"])  # fmt: skip

    def smooth_l1(a, b):
        x = (a - b).abs()
        return torch.where(x < 0.5, 0.5 * x**2 / 0.5, x - 0.25).mean(-1)

    def cosine(a, b):
        return 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    expected = sum(
        0.7 * (1.5 * cosine(s[:, 1:], t["patch"]).mean(-1) + 0.25 * cosine(s[:, 0], t["cls"]))
        + 0.3 * (1.5 * smooth_l1(s[:, 1:], t["patch"]).mean(-1) + 0.25 * smooth_l1(s[:, 0], t["cls"]))
        for s, t in zip(states, targets, strict=True)
    ) / 2
    torch.testing.assert_close(distill_loss(states, targets, None, config), expected)


def test_data_comes_from_a_folder_a_jsonl_or_the_shapes_generator(tmp_path):
    write_dataset(tmp_path, num_train=3, num_validation=2, width=2 * TILE, height=TILE)
    folder = list_images(str(tmp_path / "images"), 0)
    assert len(folder) == 5 and all(path.endswith(".png") for path in folder)
    annotated = list_images(str(tmp_path / "train.jsonl"), 0)
    assert annotated == sorted(str(tmp_path / "images" / "train" / f"{i:06d}.png") for i in range(3))
    data = load_config(DistillDataConfig, None, [f"train={tmp_path / 'train.jsonl'}", "max_tiles=4"])
    dataset = TileDataset(annotated, TILE, data)
    assert len(dataset) == 3 * 3  # a 2:1 image -> 2 x 1 grid + thumbnail
    assert dataset[4]["pixels"].shape == (3, TILE, TILE) and dataset[4]["pixels"].dtype == torch.uint8
    assert list_images("shapes:validation", 4) == [("validation", i) for i in range(4)]
    with pytest.raises(ConfigError, match="max_images=N"):
        load_config(DistillDataConfig, None, ["train=shapes:train"])


# --- the recipe -------------------------------------------------------------------------------------------------------


def distill_config(tmp_path, *overrides):
    return load_config(DistillConfig, None, [*distill_args(tmp_path), *overrides])


def distill_args(tmp_path) -> list[str]:
    """Overrides for a deterministic 8-step fp32 run: tiny teacher and student, 64 shapes tiles."""
    return [
        "teacher.dtype=float32", "student.preset=tiny-student", "loss.last_k=2", "data.max_images=64",
        "data.validation=shapes:validation", "data.validation_images=16", f"data.shapes_size={TILE}",
        f"cache.dir={tmp_path / 'cache'}", "cache.dtype=float32", "cache.shard_tiles=24", "optim.lr=3e-3",
        "optim.warmup_ratio=0", "loop.batch_size=8", "loop.max_steps=8", "loop.log_every=1", "loop.num_workers=0",
        "eval.batch_size=16", f"loop.output_dir={tmp_path / 'run'}", "eval.train_images=48", "eval.test_images=24",
    ]  # fmt: skip


def losses(path):
    return [record["loss"] for record in read_metrics(path / "metrics.jsonl") if "loss" in record]


def test_online_run_raises_the_held_out_cosine_and_writes_its_outputs(tmp_path):
    result = run_distill(distill_config(tmp_path, "loop.max_steps=40", "loop.batch_size=16"))
    evaluations = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_cosine_patch" in r]
    assert evaluations[0]["step"] == 0 and evaluations[-1]["step"] == 40
    assert evaluations[0]["eval_cosine_patch"] < 0.3 and evaluations[-1]["eval_cosine_patch"] > 0.85
    assert evaluations[-1]["eval_cosine_cls"] > 0.9
    student = InternVLVisionModel.from_pretrained(result.output)  # plain transformers, no adaptors inside
    assert not any("adaptor" in name for name in student.state_dict())
    assert (tmp_path / "run" / "loss.png").is_file() and (tmp_path / "run" / "adaptors.safetensors").is_file()
    report = run_eval(distill_config(tmp_path))
    assert report["eval_cosine_patch"] == pytest.approx(evaluations[-1]["eval_cosine_patch"], abs=1e-5)
    assert {"student_knn", "teacher_knn", "student_linear_probe", "teacher_linear_probe"} <= set(report)


def test_offline_run_reproduces_the_online_loss_curve_without_a_teacher(tmp_path, monkeypatch):
    run_distill(distill_config(tmp_path))
    online = losses(tmp_path / "run")
    summary = run_cache(distill_config(tmp_path))
    assert summary["train"]["tiles"] == 64 and summary["validation"]["tiles"] == 16

    def no_teacher(*args, **kwargs):
        raise AssertionError("offline training loaded the teacher")

    monkeypatch.setattr("ivl.distill.train.load_teacher", no_teacher)
    run_distill(distill_config(tmp_path, "mode=offline", f"loop.output_dir={tmp_path / 'offline'}"))
    assert online == pytest.approx(losses(tmp_path / "offline"), abs=1e-5)
    online_eval = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
    offline_eval = [r for r in read_metrics(tmp_path / "offline" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["eval_loss"] for r in online_eval] == pytest.approx([r["eval_loss"] for r in offline_eval], abs=1e-5)


def test_resumed_run_reproduces_the_uninterrupted_one(tmp_path, monkeypatch):
    overrides = ("loop.max_steps=6", "loop.save_every=3", "loop.keep_last=5")
    run_distill(distill_config(tmp_path, *overrides))
    uninterrupted = losses(tmp_path / "run")
    final = load_file(tmp_path / "run" / "student" / "model.safetensors")
    # A crash after step 3: the later checkpoint and the final student never got written.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000006")
    shutil.rmtree(tmp_path / "run" / "student")
    steps_run = []
    original_step = ivl.distill.train.optimizer_step
    monkeypatch.setattr(ivl.distill.train, "optimizer_step", lambda *a: steps_run.append(1) or original_step(*a))
    run_distill(distill_config(tmp_path, *overrides))
    assert len(steps_run) == 3  # it did resume: only steps 4-6 ran again
    assert losses(tmp_path / "run") == pytest.approx(uninterrupted, abs=1e-6)
    again = load_file(tmp_path / "run" / "student" / "model.safetensors")
    assert all(torch.allclose(final[name], again[name], atol=1e-6) for name in final)


@pytest.mark.parametrize("pairs", [None, [[0, 1], [1, 3]]])
def test_the_supervised_layers_are_exactly_the_configured_ones(tmp_path, pairs):
    """The final held-out cosines the recipe logs equal those restated from transformers' own hidden states
    (`output_hidden_states`: entry i + 1 is layer i's output) of the configured layers: the student's saved weights and
    adaptors on student layer s against the teacher's layer t, for each configured pair (s, t). With loss.last_k=2 on
    a 2-layer student and 4-layer teacher the pairs are (0, 2), (1, 3); the explicit pairs are not the default.
    The teacher is the tiny preset with its layer scales at 1 instead of 0.1, so that each layer moves the hidden states
    far enough for a neighbouring layer to give other cosines (with 0.1 an off-by-one moved them by only 4e-5; now
    4e-4 .. 2e-3). Both sides are the same fp32 cosines in another order: they agree to 1.5e-8, so 1e-6."""
    teacher = build_vision_model(vision_config("tiny-teacher"), 0, torch.float32)
    with torch.no_grad():
        for name, parameter in teacher.named_parameters():
            if ".lambda_" in name:
                parameter.fill_(1.0)
    teacher.save_pretrained(tmp_path / "teacher")
    overrides = ["loop.max_steps=2", f"teacher.name_or_path={tmp_path / 'teacher'}",
                 *([f"loss.pairs={pairs}"] if pairs else [])]  # fmt: skip
    config = distill_config(tmp_path, *overrides)
    result = run_distill(config)
    expected_pairs = [tuple(pair) for pair in pairs] if pairs else [(0, 2), (1, 3)]
    info = json.loads((tmp_path / "run" / "student" / "ivl_training.json").read_text())
    assert [tuple(pair) for pair in info["layer_pairs"]] == expected_pairs

    student = InternVLVisionModel.from_pretrained(result.output).eval()
    adaptors = load_file(tmp_path / "run" / "adaptors.safetensors")
    teacher.eval()
    data = config.data
    dataset = TileDataset(list_images(data.validation, data.validation_images), TILE, data)
    pixels = normalize(torch.stack([dataset[i]["pixels"] for i in range(len(dataset))]))
    with torch.no_grad():
        student_states = student(pixel_values=pixels, output_hidden_states=True).hidden_states
        teacher_states = teacher(pixel_values=pixels, output_hidden_states=True).hidden_states
    patch, cls = [], []
    for index, (s, t) in enumerate(expected_pairs):
        adapted = student_states[s + 1] @ adaptors[f"{index}.weight"].T + adaptors[f"{index}.bias"]
        cosines = torch.nn.functional.cosine_similarity(adapted, teacher_states[t + 1], dim=-1)  # [tiles, 1 + patches]
        patch.append(cosines[:, 1:].mean())
        cls.append(cosines[:, 0].mean())
    final = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_cosine_patch" in r][-1]
    assert final["step"] == 2
    assert final["eval_cosine_patch"] == pytest.approx(torch.stack(patch).mean().item(), abs=1e-6)
    assert final["eval_cosine_cls"] == pytest.approx(torch.stack(cls).mean().item(), abs=1e-6)


def test_ddp_accumulation_and_checkpointing_give_the_same_losses(tmp_path):
    """2 CPU processes x batch 4 == 1 process x batch 8 == 1 process x batch 4 x 2 accumulation steps with gradient
    checkpointing: the step's update is the mean over its global batch however it is split."""
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    common = [*distill_args(tmp_path), "data.validation=", "loop.max_steps=4"]
    torchrun("-m", "ivl.distill.train", str(config), *common, "loop.batch_size=4",
             f"loop.output_dir={tmp_path / 'ddp'}")  # fmt: skip
    run_distill(load_config(DistillConfig, None, [*common, f"loop.output_dir={tmp_path / 'one'}"]))
    run_distill(load_config(DistillConfig, None, [*common, "loop.batch_size=4", "loop.grad_accum=2",
                                                  "student.gradient_checkpointing=true",
                                                  f"loop.output_dir={tmp_path / 'acc'}"]))  # fmt: skip
    one, ddp, accumulated = (losses(tmp_path / name) for name in ("one", "ddp", "acc"))
    assert len(one) == 4 and one[-1] < one[0]
    assert ddp == pytest.approx(one, abs=1e-5)
    assert accumulated == pytest.approx(one, abs=1e-5)


# --- the cache --------------------------------------------------------------------------------------------------------


def test_cache_resumes_refuses_other_settings_and_compresses(tmp_path):
    config = distill_config(tmp_path, "data.validation=")
    run_cache(config)
    shards = sorted((tmp_path / "cache" / "train").glob("shard-*"))
    assert len(shards) == 3  # 64 tiles in shards of 24
    first = load_file(shards[0])
    shards[1].unlink()  # an interrupted run: the rerun writes only what is missing
    run_cache(config)
    assert shards[1].is_file() and torch.equal(load_file(shards[0])["layer3.patch"], first["layer3.patch"])
    assert torch.equal(first["pixels"], tiles(24))  # the exact tiles the teacher saw
    with pytest.raises(ConfigError, match="dtype"):
        run_cache(distill_config(tmp_path, "data.validation=", "cache.dtype=bfloat16"))
    # PCA to d < width, 16 of 64 patch tokens, fp8, no stored tiles: a far smaller cache, still the right targets.
    small = distill_config(tmp_path, "data.validation=", f"cache.dir={tmp_path / 'small'}", "cache.pca_dims=16",
                           "cache.patch_tokens=16", "cache.dtype=float8_e4m3fn", "cache.pca_fit_tiles=32",
                           "cache.store_pixels=false")  # fmt: skip
    summary = run_cache(small)
    # full: 2 layers x 65 tokens x 64 wide x 4 B; small: 2 x 17 x 16 x 1 B + fp32 scales + token indices
    assert summary["train"]["feature_bytes_per_tile"] < run_cache(config)["train"]["feature_bytes_per_tile"] / 20
    assert "pixels" not in load_file(tmp_path / "small" / "train" / "shard-00000.safetensors")
    with pytest.raises(ConfigError, match="holds no tiles"):
        CachedTiles(tmp_path / "small" / "train")
    item = CachedTiles(tmp_path / "small" / "train", TileDataset(list_images("shapes:train", 64), TILE, small.data))[5]
    assert torch.equal(item["pixels"], tiles(6)[5])  # cut again from the same image
    assert torch.equal(item["stored"]["token_index"], kept_tokens(5, 64, 16, 0).int())
    assert item["stored"]["layer3.patch"].shape == (16, 16)
    small.mode, small.loop.output_dir = "offline", str(tmp_path / "small-run")
    assert run_distill(small).metrics["loss"] > 0  # trains on the compressed cache end to end


# --- evaluation and export --------------------------------------------------------------------------------------------


def test_probes_separate_separable_features_and_not_random_ones():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    centres = torch.randn(3, 16, generator=generator) * 3
    features = centres[labels] + torch.randn(60, 16, generator=generator)
    assert knn_accuracy(features[:40], labels[:40], features[40:], labels[40:], k=5) == 1.0
    assert linear_probe_accuracy(features[:40], labels[:40], features[40:], labels[40:], steps=50) == 1.0
    noise = torch.randn(60, 16, generator=generator)
    assert knn_accuracy(noise[:40], labels[:40], noise[40:], labels[40:], k=5) < 0.7


def test_export_places_the_student_into_internvl_ready_for_stage1(tmp_path):
    base, _ = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    build_vision_model(vision_config("tiny-student"), seed=3).save_pretrained(tmp_path / "same")
    notes = place_into_internvl(tmp_path / "same", ModelConfig(name_or_path="preset:tiny-112"), tmp_path / "kept")
    kept, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "kept"), dtype="float32"))
    assert any("projector kept" in note for note in notes)
    processor = json.loads((tmp_path / "kept" / "processor_config.json").read_text())
    assert processor["image_seq_length"] == 16  # what the tiles of 112 px give in 14 px patches, pixel-shuffled
    assert GotOcr2ImageProcessorPil.from_pretrained(tmp_path / "kept").size["height"] == 112
    assert all(torch.equal(p, before[name]) for name, p in kept.named_parameters() if part_of(name) != "vision")
    wide = build_vision_model(vision_config("tiny-teacher"), seed=3)  # 64 wide: the projector must be rebuilt
    wide.save_pretrained(tmp_path / "vit")
    notes = place_into_internvl(tmp_path / "vit", ModelConfig(name_or_path="preset:tiny-112"), tmp_path / "model")
    assert any("re-initialised" in note for note in notes)
    model, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "model"), dtype="float32"))
    vision = model_parts(model).vision
    assert all(torch.equal(p, wide.state_dict()[name]) for name, p in vision.state_dict().items())
    for name, parameter in model.named_parameters():
        if part_of(name) == "llm":
            assert torch.equal(parameter, before[name]), name
    assert model_parts(model).projector.linear_1.in_features == 4 * 64
    pixels = normalize(tiles(1))
    image_tokens = torch.full((1, 16), model.config.image_token_id)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([torch.tensor([[1, 2]]), image_tokens], 1), pixel_values=pixels).logits
    assert torch.isfinite(logits).all()
    # Stage 1 alignment with `ivl sft` runs on it and trains the new projector only.
    write_dataset(tmp_path / "shapes", num_train=4, num_validation=1, width=TILE, height=TILE)
    sft = load_config(SFTConfig, None, [f"model.name_or_path={tmp_path / 'model'}", "model.dtype=float32",
                                        "stage=stage1", f"data.train={tmp_path / 'shapes' / 'train.jsonl'}",
                                        "data.max_tiles=1", "loop.batch_size=2", "loop.max_steps=1",
                                        "loop.num_workers=0", f"loop.output_dir={tmp_path / 'sft'}"])  # fmt: skip
    assert run_sft(sft).metrics["loss"] > 0


def test_cli_trains_and_reports_config_errors_in_one_line(tmp_path, capsys):
    from ivl.cli import main as ivl_main

    with pytest.raises(SystemExit) as help_exit:  # options after `distill` reach distill's own parser
        ivl_main(["distill", "--help"])
    assert help_exit.value.code == 0 and "cache" in capsys.readouterr().out
    assert ivl_main(["distill", "eval", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert ivl_main(["distill", "configs/distill/tiny.yaml", "mode=offline", "cache.dir="]) == 2
    assert "mode=offline reads the teacher's features from cache.dir" in capsys.readouterr().err
    overrides = ["loop.max_steps=2", "data.max_images=32", "data.validation=", f"loop.output_dir={tmp_path}"]
    assert distill_main(["configs/distill/tiny.yaml", *overrides]) == 0
    assert (tmp_path / "student" / "config.json").is_file()
