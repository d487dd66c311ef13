"""bench/gpu_check.py's CPU dry mode: the same code path as on a GPU, tiny presets, one step per contender."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_check  # noqa: E402


def test_results_file_is_named_after_the_device(tmp_path):
    assert gpu_check.results_path(tmp_path, "NVIDIA H200").name == "results_gpu_nvidia_h200.json"


def test_dry_mode_without_bitsandbytes_or_trl_runs_ours_and_padded_and_notes_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    present = gpu_check.importable
    monkeypatch.setattr(gpu_check, "importable", lambda *m: present(*m) and not {"bitsandbytes", "trl"} & set(m))
    monkeypatch.setattr(gpu_check, "DRY_CASES", gpu_check.DRY_CASES[:1] + gpu_check.DRY_CASES[2:])  # packing: below
    path = gpu_check.main(["--dry", "--out", str(tmp_path)])
    result = json.loads(path.read_text())
    assert path.parent == tmp_path and result["dry"] and not result["bitsandbytes"] and not result["trl"]
    lora, qlora = result["cases"]
    assert "bitsandbytes" in qlora["skipped"] and "trl" in lora["trl"]["skipped"]
    assert lora["predicted"]["total_gib"] > 0 and lora["predicted"]["source"] == "ivl.plan.plan_sft"
    at_data = lora["predicted_at_longest_row"]  # planned at the data's longest row: below the config's worst case
    assert 0 < at_data["row_tokens"] < 4096 and 0 < at_data["total_gib"] < lora["predicted"]["total_gib"]
    for loop in ("ours", "padded"):
        assert lora[loop]["steps"] == 1 and lora[loop]["tokens"] > 0 and lora[loop]["tokens_per_second"] > 0
    assert lora["ours"]["tokens"] == lora["padded"]["tokens"]  # the same batches for every contender
    assert lora["ours"]["speedup_vs_trl"] is None and set(result["sources"]) >= {"ours", "padded", "trl"}
    losses = result["loss_kernels"]  # the SFT loss against torch's cross-entropy; Liger's kernel noted as skipped
    assert losses["torch"]["loss_rel_error"] < 1e-5 and losses["torch"]["grad_rel_error"] < 1e-5
    assert "CUDA" in losses["liger"]["skipped"]


@pytest.mark.skipif(not gpu_check.importable("bitsandbytes"), reason="bitsandbytes not installed")
def test_dry_mode_packing_and_qlora_cases_train(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setattr(gpu_check, "DRY_CASES", gpu_check.DRY_CASES[1:])
    result = json.loads(gpu_check.main(["--dry", "--out", str(tmp_path)]).read_text())
    packed, qlora = result["cases"]
    assert packed["case"].endswith("packing=on") and "padded" not in packed and packed["ours"]["tokens"] > 0
    assert qlora["case"] == "tiny-112 qlora packing=off" and qlora["ours"]["tokens"] > 0


def test_the_proportional_bench_model_keeps_internvl3_2b_shares_and_the_heavy_one_does_not():
    from proportions import proportions_report

    # A LoRA step's matmul work for samples of 7 and 13 tiles (~100 text tokens), the lm_head on every position.
    for bench_model, checkpointing in (("proportional", False), ("proportional", True), ("heavy", False)):
        report = proportions_report(bench_model, 100, checkpointing)
        for scaled, real in zip(report[bench_model], report["internvl3-2b"], strict=True):
            assert 0.14 <= real["lm_head_share_of_llm_forward"] <= 0.16 and 0.2 <= real["vit_share"] <= 0.33
            close = (
                abs(scaled["vit_share"] - real["vit_share"]) < 0.03
                and abs(scaled["lm_head_share_of_llm_forward"] - real["lm_head_share_of_llm_forward"]) < 0.02
            )
            assert close == (bench_model == "proportional"), (bench_model, scaled, real)


def test_a_failing_case_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    ran = []

    def run_case(case, *rest):
        ran.append(case)
        if case == gpu_check.DRY_CASES[0]:
            raise RuntimeError("CUDA out of memory")
        return {"case": " ".join(map(str, case))}

    monkeypatch.setattr(gpu_check, "run_case", run_case)
    path = gpu_check.main(["--dry", "--out", str(tmp_path)])
    assert ran == gpu_check.DRY_CASES  # the cases after the failure ran too
    first, *rest = json.loads(path.read_text())["cases"]
    assert first["error"] == "RuntimeError: CUDA out of memory" and all("error" not in case for case in rest)
    assert gpu_check.failed_cases(path) == [first["case"]]
