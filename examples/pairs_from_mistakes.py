"""MPO pairs from a model's own mistakes: ask a trained model every question of an SFT jsonl, and for each of its
answers that differs from the reference, write a preference pair with the reference as `chosen` and the model's
answer as `rejected` (InternVL MPO jsonl: `image`, `question`, `chosen`, `rejected`), which `ivl mpo` trains on.

    python examples/pairs_from_mistakes.py RUN/adapter data/train.jsonl data/pairs.jsonl [--samples 4]

Each question gets the greedy answer and `--samples` answers sampled at `--temperature` (seeded): sampling finds the
mistakes the model makes with some probability, not only its most likely one. Answers are compared after `ivl eval`'s
normalisation (case, spaces, surrounding punctuation), so a right answer in another case is not a mistake, and each
distinct mistake gives one pair. Rows other than one question about an image with a reference answer are left out,
and an empty answer cannot be a rejected reply (nothing to score): both are counted. Image paths are written relative
to the output file's folder, which is where `ivl mpo` looks for them."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ivl.data.samples import DataConfig, SampleBuilder, collate_prompts, load_records, model_inputs
from ivl.evaluate import greedy_answers, normalise_answer
from ivl.model.adapters import load_trained


def single_turn(row: dict) -> tuple[str, str] | None:
    """(question, reference) of a one-question InternVL row with an image; None for any other row."""
    turns = row.get("conversations") or []
    if row.get("image") is None or len(turns) != 2 or [t.get("from") for t in turns] != ["human", "gpt"]:
        return None
    return turns[0]["value"], turns[1]["value"]


def image_paths(row: dict, root: Path, out_dir: Path) -> str | list[str]:
    images = [row["image"]] if isinstance(row["image"], str) else row["image"]
    paths = [os.path.relpath(Path(image) if Path(image).is_absolute() else root / image, out_dir) for image in images]
    return paths[0] if isinstance(row["image"], str) else paths


def sampled_answers(model, builder, inputs: dict, samples: int, temperature: float, max_new_tokens: int) -> list:
    """`samples` sampled answers per prompt of a left-padded batch: [[answer, ...] per prompt]."""
    tokenizer = builder.tokenize.tokenizer
    end_ids = sorted({tokenizer.convert_tokens_to_ids(builder.tokenize.end_token), tokenizer.eos_token_id} - {None})
    output = model.generate(**inputs, do_sample=True, temperature=temperature, top_k=0, num_return_sequences=samples,
                            max_new_tokens=max_new_tokens, eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [texts[i : i + samples] for i in range(0, len(texts), samples)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a run's adapter/ or model/ directory")
    parser.add_argument("data", help="InternVL jsonl with one question and its reference answer per row")
    parser.add_argument("out", help="the MPO jsonl to write")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4, help="sampled answers per question, besides the greedy one")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    model, tokenizer, info = load_trained(args.model)
    builder = SampleBuilder(tokenizer, model.config, DataConfig(**info.get("data", {})))
    records = [r for r in load_records(args.data) if r.row is not None and single_turn(r.row) is not None]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {"questions": len(records), "answers": 0, "right": 0, "empty": 0, "pairs": 0}
    with out.open("w") as file:
        for start in range(0, len(records), args.batch_size):
            chunk = records[start : start + args.batch_size]
            batch = collate_prompts([builder.build_prompt(r) for r in chunk], tokenizer.pad_token_id)
            inputs = model_inputs(batch, model.device, model.dtype)
            answers = [[a] for a in greedy_answers(model, builder, inputs, args.max_new_tokens)]
            if args.samples:
                sampled = sampled_answers(model, builder, inputs, args.samples, args.temperature, args.max_new_tokens)
                answers = [greedy + more for greedy, more in zip(answers, sampled, strict=True)]
            for record, options in zip(chunk, answers, strict=True):
                question, reference = single_turn(record.row)
                rejected = set()
                for answer in (a.strip() for a in options):
                    counts["answers"] += 1
                    if normalise_answer(answer) == normalise_answer(reference):
                        counts["right"] += 1
                    elif not answer:
                        counts["empty"] += 1
                    elif normalise_answer(answer) not in rejected:  # each distinct mistake once
                        rejected.add(normalise_answer(answer))
                        pair = {"image": image_paths(record.row, record.source.root, out.parent), "question": question,
                                "chosen": reference, "rejected": answer}  # fmt: skip
                        file.write(json.dumps(pair) + "\n")
                        counts["pairs"] += 1
    print(f"{counts['questions']} questions, {counts['answers']} answers: {counts['right']} right, "
          f"{counts['empty']} empty; {counts['pairs']} pairs written to {out}")  # fmt: skip
    left_out = sum(1 for r in load_records(args.data) if r.row is None or single_turn(r.row) is None)
    if left_out:
        print(f"{left_out} rows left out (not one question about an image with a reference answer)")


if __name__ == "__main__":
    main()
