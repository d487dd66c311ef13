"""MPO: the loss against TRL and the formula of docs/design/mpo.md, the reward shift, the reference policy, the
shared-image forward, preference data, and the recipe end to end on a tiny model."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from trl.trainer.dpo_trainer import DPOTrainer

from ivl.cli import main as cli_main
from ivl.config import ConfigError, load_config
from ivl.data.checks import check_data
from ivl.data.preference import ANSWER_KEYS, PairDataset, build_pair, collate_pairs
from ivl.data.samples import SampleBuilder, load_records, model_inputs
from ivl.data.shapes import make_sample, write_split
from ivl.demo.preference import (
    ANSWERS,
    REASONING_SUFFIX,
    preference_pair,
    write_preference_split,
    write_reasoning_split,
    write_sft_meta,
)
from ivl.finetune.mpo import MPOConfig, run_mpo
from ivl.finetune.preference import ReferencePolicy, pair_logps
from ivl.losses import mpo_loss
from ivl.model.adapters import AdapterConfig, PartConfig, VisionPartConfig, apply_trainability, resolve_modes
from ivl.model.checkpoint import load_trainable_state_dict
from ivl.model.load import ModelConfig, load_model, load_model_config, load_tokenizer
from ivl.model.parts import model_parts
from tests.helpers import torchrun


def _trl_mpo_loss(policy_tokens, ref_chosen, ref_rejected, completion_mask, beta):
    """TRL's own DPOTrainer loss (`_compute_loss`) with loss_type=["sigmoid", "bco_pair", "sft"], weights
    [0.8, 0.2, 1.0] and precomputed reference log-probs; the model is a stand-in that returns the given per-token
    log-probs [2B, T-1] (rows: chosen then rejected), so only TRL's loss arithmetic runs."""
    rows, length = policy_tokens.shape
    outputs = SimpleNamespace(
        log_probs=policy_tokens,
        entropy=torch.zeros(rows, length),
        mean_logits=torch.zeros(rows, length),
        is_top1=torch.zeros(rows, length, dtype=torch.bool),
    )
    accelerator = SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics={"train": __import__("collections").defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(rows, length + 1, dtype=torch.long),
        "attention_mask": torch.ones(rows, length + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)


def _preference_batch(pairs=4, length=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * pairs, length + 1, dtype=torch.long)
    for row in range(2 * pairs):
        completion_mask[row, 3 + row % 3 :] = 1  # prompts of different lengths
    mask = completion_mask[:, 1:].float()
    tokens = -torch.rand(2 * pairs, length, generator=generator) * 3 * mask  # TRL's log_probs are 0 off the answer
    ref = (tokens + 0.5 * torch.randn(2 * pairs, length, generator=generator) * mask).sum(1)
    return tokens, ref, completion_mask, mask


def test_mpo_loss_without_shift_equals_trls_sigmoid_bco_pair_sft_combination():
    tokens, ref, completion_mask, mask = _preference_batch()
    pairs = tokens.shape[0] // 2
    beta = 0.1
    expected = _trl_mpo_loss(tokens, ref[:pairs], ref[pairs:], completion_mask, beta)
    sequence = tokens.sum(1)
    sft_loss = -tokens[:pairs][mask[:pairs].bool()].mean()  # the chosen answers' token-averaged NLL
    loss, metrics = mpo_loss(sequence[:pairs], sequence[pairs:], ref[:pairs], ref[pairs:], sft_loss, beta=beta)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    chosen, rejected = beta * (sequence[:pairs] - ref[:pairs]), beta * (sequence[pairs:] - ref[pairs:])
    assert metrics["rewards_accuracy"].item() == (chosen > rejected).float().mean().item()
    # At the start the policy is the reference: every reward is 0, and a tie is not a correct ranking (as TRL counts).
    _, start = mpo_loss(ref[:pairs], ref[pairs:], ref[:pairs], ref[pairs:], sft_loss, beta=beta)
    assert start["rewards_accuracy"].item() == 0.0 and start["rewards_margin"].item() == 0.0
    assert metrics["reward_sum"].item() == pytest.approx((chosen.sum() + rejected.sum()).item(), rel=1e-6)
    assert metrics["reward_count"].item() == 2 * pairs


def test_mpo_loss_with_shift_equals_the_spec_formula():
    policy_chosen, policy_rejected = torch.tensor([-3.0, -5.0, -2.5]), torch.tensor([-4.0, -4.5, -6.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -4.0, -3.0]), torch.tensor([-3.0, -5.0, -5.5])
    sft_loss, beta, delta = torch.tensor(0.7), 0.5, 0.3
    loss, _ = mpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, sft_loss, beta=beta,
                       weights=(0.8, 0.2, 1.0), reward_shift=delta)  # fmt: skip
    total = 0.0
    for pc, pr, rc_ref, rr_ref in zip(policy_chosen, policy_rejected, ref_chosen, ref_rejected, strict=True):
        r_c, r_r = beta * (pc - rc_ref), beta * (pr - rr_ref)
        l_pref = -torch.log(torch.sigmoid(r_c - r_r))
        l_qual = -torch.log(torch.sigmoid(r_c - delta)) - torch.log(torch.sigmoid(-(r_r - delta)))
        total += (0.8 * l_pref + 0.2 * l_qual) / 3
    assert loss.item() == pytest.approx((total + 0.7).item(), rel=1e-6)
    unshifted, _ = mpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, sft_loss, beta=beta)
    assert unshifted.item() != pytest.approx(loss.item(), rel=1e-4)  # the shift matters


# --- data, pair forward and reference policy on a tiny model ---------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """16 train / 8 validation preference pairs of the shapes task at 112 px, and the SFT-format validation split."""
    root = tmp_path_factory.mktemp("pairs")
    write_preference_split(root, "train", 16, 112, 112)
    write_preference_split(root, "validation", 8, 112, 112)
    write_split(root, "validation", 8, 112, 112)
    return root


def tiny_mpo(pairs, out, *overrides):
    return load_config(MPOConfig, None, [
        f"data.train={pairs / 'train_preference.jsonl'}", "data.max_tiles=1", "data.use_thumbnail=false",
        "model.dtype=float32", "adapter.dropout=0", "optim.lr=5e-3", "optim.warmup_ratio=0", "loop.max_steps=2",
        "loop.log_every=1", "loop.num_workers=0", "loop.batch_size=4", f"loop.output_dir={out}", *overrides,
    ])  # fmt: skip


def _pair_batch(model, pairs, count=3):
    config = tiny_mpo(pairs, "unused")
    builder = SampleBuilder(load_tokenizer(config.model), model.config, config.data)
    dataset = PairDataset(load_records(pairs / "train_preference.jsonl"), builder)
    batch = collate_pairs([dataset[i] for i in range(count)], builder.tokenize.tokenizer.pad_token_id)
    inputs = model_inputs(batch)
    return inputs, inputs.pop("labels"), batch


def _lora_model(kind="lora"):
    model, _ = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    adapter = AdapterConfig(kind=kind, dropout=0.0)
    return apply_trainability(model, resolve_modes("none", VisionPartConfig(), PartConfig(), PartConfig()),
                              VisionPartConfig(), adapter)  # fmt: skip


def _separate_logps(model, inputs, labels, rows):
    """Answer log-probs of `rows` from the plain forward with full logits (the reference implementation)."""
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"][rows], attention_mask=inputs["attention_mask"][rows],
                       pixel_values=inputs["pixel_values"]).logits  # fmt: skip
    targets = labels[rows][:, 1:]
    logps = logits[:, :-1].float().log_softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    return (logps * (targets != -100)).sum(1)


def test_a_pair_runs_the_vit_once_and_matches_two_separate_forwards(pairs):
    torch.manual_seed(0)
    model = _lora_model()
    with torch.no_grad():  # a non-trivial adapter, so the policy is not the base
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(0.05 * torch.randn_like(parameter))
    inputs, labels, _ = _pair_batch(model, pairs)
    vision_calls = []
    model_parts(model).vision.register_forward_hook(lambda *args: vision_calls.append(1))
    policy = pair_logps(model, inputs, labels)
    assert len(vision_calls) == 1
    policy.sums.sum().backward()  # differentiable through the shared features
    assert model_parts(model).projector.modules_to_save.default.linear_1.weight.grad is not None
    vision_calls.clear()
    chosen, rejected = (
        _separate_logps(model, inputs, labels, slice(0, 3)),
        _separate_logps(model, inputs, labels, slice(3, 6)),
    )
    assert len(vision_calls) == 2  # the plain way: once per side
    assert torch.allclose(policy.sums.detach(), torch.cat([chosen, rejected]), atol=1e-4)
    assert not torch.allclose(chosen, rejected)


@pytest.mark.parametrize("kind", ["lora", "partial_lora"])
def test_reference_with_disabled_adapters_equals_the_untouched_base(pairs, kind):
    torch.manual_seed(0)
    model = _lora_model(kind)
    with torch.no_grad():  # trained LoRA and projector (modules_to_save) weights
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(0.05 * torch.randn_like(parameter))
    base, _ = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    inputs, labels, _ = _pair_batch(model, pairs)
    reference = ReferencePolicy(model)(inputs, labels)
    with torch.no_grad():
        expected = pair_logps(base, inputs, labels).sums
        policy = pair_logps(model, inputs, labels).sums
    assert torch.allclose(reference, expected, atol=1e-5)
    assert not torch.allclose(policy, expected, atol=1e-3)  # the adapter does change the policy


def test_preference_data_layouts_and_bad_rows(pairs, tmp_path):
    from datasets import Dataset

    image = str(pairs / "images/train_preference/000000.png")

    def text(role, words):
        return [{"role": role, "content": [{"type": "text", "text": words}]}]

    image_prompt = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Color?"}]}]
    rows = [
        {"prompt": image_prompt, "chosen": text("assistant", "red"), "rejected": text("assistant", "blue"),
         "images": [image]},
        {"prompt": text("user", "Two words?"), "chosen": text("assistant", "yes please"),
         "rejected": text("assistant", "no thanks"), "images": []},
    ]  # fmt: skip
    Dataset.from_list(rows).save_to_disk(tmp_path / "trl")
    config = tiny_mpo(pairs, tmp_path)
    builder = SampleBuilder(load_tokenizer(config.model), load_model_config(config.model), config.data)
    built = [build_pair(builder, record) for record in load_records(tmp_path / "trl")]
    assert built[0]["chosen"]["num_tiles"] == [1] and built[1]["chosen"]["tiles"] is None
    for pair in built:  # same prompt, labels only on the answers
        chosen, rejected = pair["chosen"], pair["rejected"]
        prompt = int((chosen["labels"] == -100).long().argmin())
        assert torch.equal(chosen["input_ids"][:prompt], rejected["input_ids"][:prompt])
        assert (rejected["labels"][:prompt] == -100).all() and (rejected["labels"][prompt:] != -100).any()
    jsonl = tmp_path / "mpo.jsonl"
    lines = [
        {"image": [image, image], "question": "<image>\n<image>\nSame?", "chosen": "yes", "rejected": "no"},
        {"question": "No image?", "chosen": "fine", "rejected": "bad"},
        {"prompt": "TRL strings?", "chosen": "fine", "rejected": "bad"},
        {"image": image, "question": "Q?", "chosen": "same", "rejected": "same"},
        {"image": image, "question": "<image>\n<image>\nQ?", "chosen": "a", "rejected": "b"},
    ]
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert build_pair(builder, load_records(jsonl)[0])["chosen"]["num_tiles"] == [1, 1]
    report = check_data(jsonl, builder, progress=False)
    assert report.rows_ok == 3
    assert [(loc.rsplit(":", 1)[1], reason) for loc, reason in report.bad_rows] == [
        ("4", "'chosen' and 'rejected' are the same answer: nothing to prefer"),
        ("5", "2 <image> placeholder(s) but 1 image(s)"),
    ]
    assert cli_main(["data", "check", str(jsonl), "data.max_tiles=1"]) == 1


def test_demo_pairs_share_a_one_clause_reason_and_differ_in_the_answer_only(tmp_path):
    kinds = set()
    for index in range(8):
        row, _ = preference_pair("train", index, 112, 112)
        sample = make_sample("train", index, 112, 112)
        (chosen_reason, chosen), (rejected_reason, rejected) = (row[k].split(" Answer: ") for k in ANSWER_KEYS)
        assert row["question"].endswith(REASONING_SUFFIX) and chosen_reason == rejected_reason
        assert chosen == sample.answer and chosen in chosen_reason and chosen_reason.count(".") == 1
        assert rejected != chosen and rejected in ANSWERS[sample.kind]
        kinds.add(sample.kind)
    assert kinds == set(ANSWERS)
    # The SFT mix before MPO: short answers and reason-then-answer rows on other images than the pairs'.
    short = write_split(tmp_path, "train", 4, 112, 112)
    meta = write_sft_meta(tmp_path, [short, write_reasoning_split(tmp_path, "train", range(8, 12), 112, 112)])
    answers = [record.row["conversations"][1]["value"] for record in load_records(meta)]
    assert answers[:4] == [make_sample("train", i).answer for i in range(4)]
    assert answers[4:] == [preference_pair("train", i, 112, 112)[0]["chosen"] for i in range(8, 12)]


# --- the recipe end to end --------------------------------------------------------------------------------------------


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _shift(checkpoint):
    return json.loads((checkpoint / "state.json").read_text())["reward_shift"]


def test_recipe_trains_logs_checkpoints_and_resumes_with_the_same_reward_shift(pairs, tmp_path):
    overrides = ("loop.max_steps=4", "loop.save_every=2", "loop.keep_last=5", "eval.exact_match_samples=4",
                 f"data.validation={pairs / 'validation.jsonl'}")  # fmt: skip
    result = run_mpo(tiny_mpo(pairs, tmp_path, *overrides))
    steps = [r for r in _records(tmp_path) if "rewards_accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["rewards_margin"] == 0 and steps[0]["reward_shift"] == 0  # policy == reference before any update
    assert steps[-1]["rewards_margin"] != 0 and steps[-1]["reward_shift"] != 0
    assert "eval_exact_match" in result.metrics and (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "loss.png").is_file()
    shift_at_4 = _shift(tmp_path / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "checkpoints" / "step-000004")  # a crash after step 2
    shutil.rmtree(tmp_path / "adapter")
    run_mpo(tiny_mpo(pairs, tmp_path, *overrides))
    assert _shift(tmp_path / "checkpoints" / "step-000004") == pytest.approx(shift_at_4, rel=1e-6)
    resumed = [r for r in _records(tmp_path) if "rewards_accuracy" in r]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in steps], abs=1e-6)


def test_reward_shift_is_the_same_whatever_the_micro_batch_split(pairs, tmp_path):
    shifts = []
    for batch_size, grad_accum in ((8, 1), (2, 4), (1, 8)):
        out = tmp_path / f"{batch_size}x{grad_accum}"
        run_mpo(tiny_mpo(pairs, out, f"loop.batch_size={batch_size}", f"loop.grad_accum={grad_accum}",
                         "loop.save_every=2"))  # fmt: skip
        shifts.append(_shift(out / "checkpoints" / "step-000002"))
    assert shifts[0] != 0
    assert shifts[1] == pytest.approx(shifts[0], rel=1e-5) and shifts[2] == pytest.approx(shifts[0], rel=1e-5)


def test_precomputed_reference_equals_on_the_fly_and_a_stale_cache_is_refused(pairs, tmp_path):
    config = tmp_path / "mpo.yaml"
    config.write_text("mpo: {beta: 0.5}\n")
    cache = tmp_path / "reference.pt"
    assert cli_main(["mpo", str(config), *_overrides(pairs, tmp_path / "fly")]) == 0
    run_mpo(tiny_mpo(pairs, tmp_path / "pre", "mpo.beta=0.5", "mpo.precompute_reference=true",
                     f"mpo.reference_cache={cache}"))  # fmt: skip
    assert cache.is_file()
    on_the_fly, precomputed = (_records(tmp_path / name) for name in ("fly", "pre"))
    assert [r["loss"] for r in precomputed] == pytest.approx([r["loss"] for r in on_the_fly], abs=1e-5)
    assert [r["rewards_margin"] for r in precomputed] == pytest.approx(
        [r["rewards_margin"] for r in on_the_fly], abs=1e-6
    )
    with pytest.raises(ConfigError, match="key mismatch"):
        run_mpo(tiny_mpo(pairs, tmp_path / "stale", "mpo.precompute_reference=true", f"mpo.reference_cache={cache}",
                         "data.max_length=200"))  # fmt: skip


def _overrides(pairs, out):
    config = tiny_mpo(pairs, out)
    return [f"data.train={config.data.train}", "data.max_tiles=1", "data.use_thumbnail=false", "model.dtype=float32",
            "adapter.dropout=0", "optim.lr=5e-3", "optim.warmup_ratio=0", "loop.max_steps=2", "loop.log_every=1",
            "loop.num_workers=0", "loop.batch_size=4", f"loop.output_dir={out}"]  # fmt: skip


@pytest.mark.parametrize("option", ["data.packing=true", "data.padding_free=true"])
def test_packing_options_are_refused_not_ignored(pairs, tmp_path, option):
    with pytest.raises(ConfigError, match=r"ivl mpo does not pack"):
        tiny_mpo(pairs, tmp_path, option, "loop.max_steps=2")


def test_continuing_an_sft_adapter_uses_it_as_the_reference(pairs, shapes, tmp_path):
    from ivl.finetune.sft import SFTConfig, run_sft

    sft = run_sft(load_config(SFTConfig, None, [*_overrides(pairs, tmp_path / "sft"), "loop.max_steps=1",
                                               f"data.train={shapes / 'train.jsonl'}"]))  # fmt: skip
    with pytest.raises(ConfigError, match="precompute_reference=true"):
        tiny_mpo(pairs, tmp_path / "mpo", f"mpo.init_adapter={sft.output}")
    run_mpo(tiny_mpo(pairs, tmp_path / "mpo", f"mpo.init_adapter={sft.output}", "mpo.precompute_reference=true"))
    steps = [r for r in _records(tmp_path / "mpo") if "rewards_accuracy" in r]
    assert steps[0]["rewards_chosen"] == pytest.approx(0, abs=1e-6)  # the SFT policy is the reference
    assert steps[1]["rewards_margin"] != 0
    info = json.loads((tmp_path / "mpo" / "adapter" / "ivl_training.json").read_text())
    assert info["recipe"] == "mpo" and info["modes"]["llm"] == "lora"


def test_full_training_uses_a_frozen_copy_as_reference(pairs, tmp_path):
    run_mpo(tiny_mpo(pairs, tmp_path, "stage=stage1", "optim.lr=1e-2"))
    steps = [r for r in _records(tmp_path) if "rewards_accuracy" in r]
    assert steps[0]["rewards_margin"] == 0 and steps[1]["rewards_margin"] != 0
    assert (tmp_path / "model" / "config.json").is_file()


def test_two_processes_match_one_process_with_the_same_global_batch(pairs, tmp_path):
    """2 CPU processes x 2 pairs == 1 process x 4 pairs: losses, rewards, reward shift and the updated weights of every
    trained part, the ViT (LoRA) and projector included. Their features are computed once per pair, before the LLM:
    if that pass escaped DDP, their gradients would not be averaged over the processes and the weights would differ.
    Two steps, because Adam's first update only sees the gradients' signs."""
    common = [f"data.train={pairs / 'train_preference.jsonl'}", "data.max_tiles=1", "data.use_thumbnail=false",
              "model.dtype=float32", "adapter.dropout=0", "vision.mode=lora", "optim.lr=5e-3", "optim.warmup_ratio=0",
              "loop.max_steps=2", "loop.log_every=1", "loop.save_every=2", "loop.num_workers=0"]  # fmt: skip
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    torchrun("-m", "ivl.finetune.mpo", str(config), *common, "loop.batch_size=2", f"loop.output_dir={tmp_path / 'ddp'}")
    run_mpo(load_config(MPOConfig, None, [*common, "loop.batch_size=4", f"loop.output_dir={tmp_path / 'one'}"]))
    one, ddp = (_records(tmp_path / name) for name in ("one", "ddp"))
    assert len(one) == 2 and one[1]["rewards_margin"] != 0
    for name in ("loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "reward_shift"):
        assert [r[name] for r in ddp] == pytest.approx([r[name] for r in one], abs=1e-5), name
    assert _shift(tmp_path / "ddp/checkpoints/step-000002") == pytest.approx(
        _shift(tmp_path / "one/checkpoints/step-000002"), rel=1e-5
    )
    one_weights, ddp_weights = (
        load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("one", "ddp")
    )
    assert one_weights.keys() == ddp_weights.keys()
    trained_parts = {part: [name for name in one_weights if f".{part}." in name]
                     for part in ("vision_tower", "multi_modal_projector", "language_model")}  # fmt: skip
    assert all(trained_parts.values()), trained_parts
    assert all(one_weights[name].abs().sum() > 0 for name in trained_parts["vision_tower"] if "lora_B" in name)
    for name, expected in one_weights.items():
        assert torch.allclose(ddp_weights[name], expected, atol=1e-5), name


def _answer_logps(model, inputs, labels, rows):
    """Per-row sums of the answer tokens' log-probs and the answers' token counts of `rows`, from a plain forward
    with full logits (no shared ViT pass, no chunked projection): the formula's log pi(y|x), restated."""
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"][rows], attention_mask=inputs["attention_mask"][rows],
                       pixel_values=inputs["pixel_values"]).logits.double()  # fmt: skip
    targets = labels[rows][:, 1:]
    supervised = targets != -100
    logps = logits[:, :-1].log_softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    return (logps * supervised).sum(1), supervised.sum(1)


def test_recipe_steps_equal_the_mpo_formula_with_asymmetric_weights_and_the_running_reward_shift(pairs, tmp_path):
    """Each logged step of a single-process run (all 16 pairs in one batch) against the formula, restated:
    L = w_p * mean(-log s(r_c - r_r)) + w_q * mean(-log s(r_c - d) - log s(-(r_r - d))) + w_g * NLL(chosen) / |chosen|
    with r = beta * (log pi - log pi_ref), pi the policy as checkpointed after the previous step, pi_ref the base, and
    d the mean of every reward of all earlier steps. The three weights differ (a swap changes the loss), beta is not
    the default, the SFT term is on the chosen answers over their tokens only.
    Tolerance: both sides run the same fp32 model and differ only in summation order (the recipe's shared ViT pass and
    chunked log-softmax against one plain forward in float64 here): float32 rounding of log-probs whose sums stay
    below 100, ~1e-5 at most in a sum, so ~3e-6 in a reward (times beta); measured 4e-7 on the loss, 8e-7 on a reward.
    2e-5 is 50x above that and 50x below the smallest move of a planted fault (1.1e-3, the SFT term on rejected
    answers)."""
    weights, beta, steps = (0.7, 0.2, 0.45), 0.3, 3
    out = tmp_path / "run"
    config = tiny_mpo(pairs, out, "loop.batch_size=16", f"loop.max_steps={steps}", "loop.save_every=1",
                      "loop.keep_last=5", f"mpo.beta={beta}", f"mpo.preference_weight={weights[0]}",
                      f"mpo.quality_weight={weights[1]}", f"mpo.generation_weight={weights[2]}")  # fmt: skip
    run_mpo(config)
    logged = [r for r in _records(out) if "rewards_accuracy" in r]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))

    base, _ = load_model(ModelConfig(name_or_path="preset:tiny-112", dtype="float32"))
    inputs, labels, _ = _pair_batch(base, pairs, count=16)
    chosen, rejected = slice(0, 16), slice(16, 32)
    ref_chosen, _ = _answer_logps(base, inputs, labels, chosen)
    ref_rejected, _ = _answer_logps(base, inputs, labels, rejected)
    policy = apply_trainability(load_model(config.model)[0], config.modes(), config.vision, config.adapter)
    reward_sum, reward_count = 0.0, 0
    for step, record in enumerate(logged, start=1):
        if step > 1:  # the weights this step's forward saw: those saved after the previous step
            previous = out / "checkpoints" / f"step-{step - 1:06d}" / "trainable.safetensors"
            load_trainable_state_dict(policy, load_file(previous), previous)
        policy_chosen, chosen_tokens = _answer_logps(policy, inputs, labels, chosen)
        policy_rejected, _ = _answer_logps(policy, inputs, labels, rejected)
        r_c, r_r = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
        shift = reward_sum / reward_count if reward_count else 0.0
        preference = -torch.nn.functional.logsigmoid(r_c - r_r).mean()
        quality = (-torch.nn.functional.logsigmoid(r_c - shift) - torch.nn.functional.logsigmoid(-(r_r - shift))).mean()
        generation = -policy_chosen.sum() / chosen_tokens.sum()
        expected = weights[0] * preference + weights[1] * quality + weights[2] * generation
        assert record["loss"] == pytest.approx(expected.item(), abs=2e-5), step
        assert record["rewards_chosen"] == pytest.approx(r_c.mean().item(), abs=1e-5), step
        assert record["rewards_rejected"] == pytest.approx(r_r.mean().item(), abs=1e-5), step
        reward_sum, reward_count = reward_sum + (r_c.sum() + r_r.sum()).item(), reward_count + 32
        assert record["reward_shift"] == pytest.approx(reward_sum / reward_count, abs=1e-5), step
    assert abs(logged[-1]["rewards_margin"]) > 1e-3 and abs(logged[-1]["reward_shift"]) > 1e-4  # not a trivial run


def _full_logits_logp(model, input_ids, labels, pixel_values):
    """log pi of one unpadded row's answer: the whole [T, V] logits of a plain forward, log-softmax, the label tokens
    (independent of the kit's path: hidden states, answer positions only, one ViT pass per pair)."""
    mask = torch.ones_like(input_ids)[None]
    output = model(input_ids=input_ids[None], pixel_values=pixel_values, attention_mask=mask)
    logps = torch.log_softmax(output.logits[0, :-1].float(), -1)
    targets = labels[1:]
    answer = targets != -100
    return logps[answer].gather(1, targets[answer, None]).sum().item()


def test_held_out_pairs_report_reward_accuracy_and_margin(pairs, tmp_path):
    """mpo.validation_pairs: before any update the policy is the reference, so every margin is exactly 0 and the
    accuracy (a pair counts when the chosen reward is strictly above the rejected one, as TRL counts) is 0. After two
    steps the evaluation equals beta x log(pi / pi_ref) of each answer computed here from full logits."""
    from ivl.finetune.mpo import evaluate_pairs, setup
    from ivl.model.adapters import load_adapter_onto

    held_out = pairs / "validation_preference.jsonl"
    start = setup(tiny_mpo(pairs, tmp_path / "start", f"mpo.validation_pairs={held_out}"))
    assert evaluate_pairs(start, 0) == {"eval_rewards_accuracy": 0.0, "eval_rewards_margin": 0.0}
    config = tiny_mpo(pairs, tmp_path / "run", f"mpo.validation_pairs={held_out}", "loop.eval_every=1")
    result = run_mpo(config)
    evaluated = [r for r in _records(tmp_path / "run") if "eval_rewards_accuracy" in r]
    assert [r["step"] for r in evaluated] == [1, 2]
    assert result.metrics["eval_rewards_margin"] == evaluated[-1]["eval_rewards_margin"]

    base, tokenizer = load_model(config.model)
    model = load_adapter_onto(base, tmp_path / "run" / "adapter", config.model.name_or_path).eval()
    dataset = PairDataset(load_records(held_out), SampleBuilder(tokenizer, base.config, config.data))
    margins = []
    with torch.no_grad():
        for index in range(len(dataset)):
            batch = collate_pairs([dataset[index]], tokenizer.pad_token_id)
            pixel_values = model_inputs(batch)["pixel_values"]
            rewards = []
            for row in range(2):  # chosen, rejected
                kept = batch["attention_mask"][row].bool()
                ids, labels = batch["input_ids"][row][kept], batch["labels"][row][kept]
                policy = _full_logits_logp(model, ids, labels, pixel_values)
                with model.disable_adapter():
                    reference = _full_logits_logp(model, ids, labels, pixel_values)
                rewards.append(config.mpo.beta * (policy - reference))
            margins.append(rewards[0] - rewards[1])
    assert len(margins) == 8 and any(m != 0 for m in margins)
    assert evaluated[-1]["eval_rewards_margin"] == pytest.approx(sum(margins) / 8, abs=1e-5)
    assert evaluated[-1]["eval_rewards_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 8, abs=1e-6)
