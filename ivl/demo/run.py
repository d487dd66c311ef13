"""`ivl demo`: the built-in default job. Writes the synthetic shapes task, measures the shipped base model's validation
exact-match, fine-tunes it with the SFT recipe (`ivl/assets/demo_sft.yaml`), and measures again.

The base (`ivl/assets/demo_base/`, built by `python -m ivl.demo.pretrain`) is a tiny InternVL pre-trained to describe
shapes scenes in sentences; it has never seen the demo's short-answer questions."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from ivl.config import load_config
from ivl.data.shapes import write_dataset
from ivl.demo.pretrain import IMAGE_SIZE, demo_base_path
from ivl.evaluate import run_eval
from ivl.finetune.sft import SFTConfig, run_sft
from ivl.options import EvalConfig, EvalOptions
from ivl.runtime import use_cpu_threads


def demo_config_path() -> Path:
    return Path(str(resources.files("ivl") / "assets" / "demo_sft.yaml"))


def run_demo(
    out_dir: str | Path = "outputs/demo", num_train: int = 2000, num_validation: int = 256, overrides: list[str] = ()
) -> dict:
    """The demo end to end; `overrides` go on top of the demo config (e.g. a shorter run)."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    data = out_dir / "data"
    overrides = [
        f"data.train={data / 'train.jsonl'}",
        f"data.validation={data / 'validation.jsonl'}",
        f"loop.output_dir={out_dir / 'run'}",
        f"model.name_or_path={demo_base_path()}",
        *overrides,
    ]
    config = load_config(SFTConfig, demo_config_path(), overrides)  # a bad override fails here, before any work
    use_cpu_threads(config.loop.cpu_threads)  # from the first evaluation on (the SFT run sets it again)
    print(f"[1/4] writing the shapes task ({num_train} train / {num_validation} validation) to {data}")
    write_dataset(data, num_train, num_validation, width=IMAGE_SIZE, height=IMAGE_SIZE)

    print("[2/4] validation exact-match of the shipped base model (pre-trained to describe scenes, before SFT)")
    before = run_eval(
        EvalConfig(
            model=config.model,
            data=config.data,
            eval=EvalOptions(
                batch_size=config.eval.batch_size,
                exact_match_samples=config.eval.exact_match_samples,
                max_new_tokens=config.eval.max_new_tokens,
            ),
        )
    )
    print(f"      exact match {before['exact_match']:.3f}, loss {before['loss']:.3f} (chance: at most 0.25)")

    print(f"[3/4] SFT ({config.stage}: {config.loop.max_steps} steps of {config.loop.batch_size} samples)")
    result = run_sft(config)
    after = result.metrics["eval_exact_match"]
    print(f"[4/4] validation exact-match after SFT: {after:.3f} (before {before['exact_match']:.3f}), "
          f"loss {result.metrics['eval_loss']:.3f} (before {before['loss']:.3f})")  # fmt: skip
    run = out_dir / "run"
    print(f"done in {time.perf_counter() - started:.0f}s.")
    print(f"  trained model  {result.output}")
    print(f"  metrics        {run / 'metrics.jsonl'}")
    print(f"  loss curve     {run / 'loss.png'}")
    print("Next:")
    print(f"  ivl chat --adapter {result.output} --image {data / 'images/validation/000000.png'} "
          "\"What color is the object at the top left?\"")  # fmt: skip
    print(
        "  ivl data check YOUR.jsonl model.name_or_path=OpenGVLab/InternVL3-1B-hf      # your data, real token counts"
    )
    print(
        "  ivl sft configs/sft/internvl3_1b_lora.yaml data.train=YOUR.jsonl             # a real checkpoint, on a GPU"
    )
    return {
        "exact_match_before": before["exact_match"],
        "exact_match_after": after,
        "loss_before": before["loss"],
        "loss_after": result.metrics["eval_loss"],
        "seconds": time.perf_counter() - started,
    }
