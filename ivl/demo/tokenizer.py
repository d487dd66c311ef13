"""The small tokenizer shipped with the kit (`ivl/assets/demo_tokenizer/`), and the script that built it.

Byte-level BPE (any text tokenizes) trained on the shapes task's text plus a little English, with InternVL's special
tokens and a ChatML chat template, laid out like the `-hf` checkpoints' tokenizers so transformers' InternVL processor
accepts it. Rebuild with `python -m ivl.demo.tokenizer` (deterministic).
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ivl.data.shapes import training_text
from ivl.model.presets import demo_tokenizer_path

VOCAB_SIZE = 1024
# Order follows the Qwen2-based InternVL tokenizers: ChatML tokens, then InternVL's image/grounding tokens.
RESERVED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>",
]  # fmt: skip
# Same layout as the InternVL `-hf` chat templates: string content, or a list of image / video / text parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ENGLISH = """The quick brown fox jumps over the lazy dog. Describe the image in detail. What is shown here?
Answer the question using a single word or phrase. Please look at the picture and answer. There is a table with
numbers, an invoice, a scan, a photo of a factory line. You are a helpful assistant. The answer is yes. The answer
is no. Frame one, frame two. Count the objects from left to right and from top to bottom."""


def build_demo_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerBase:
    """Train the demo tokenizer from scratch and save it (tokenizer.json + config with template and specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(RESERVED_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([ENGLISH, *training_text()], trainer=trainer)
    backend.add_special_tokens(RESERVED_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


if __name__ == "__main__":
    built = build_demo_tokenizer(demo_tokenizer_path())
    print(f"wrote {demo_tokenizer_path()} ({len(built)} tokens)")
