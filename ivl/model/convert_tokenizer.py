"""Tokenizers of original InternVL checkpoints -> tokenizers transformers loads without remote code, and back.

Qwen2 / LLaMA / Phi-3 originals ship tokenizers transformers knows. InternLM2 originals ship a sentencepiece model
(`tokenizer.model`) behind remote code (`InternLM2Tokenizer`); it becomes a LLaMA-style fast tokenizer (byte-fallback
BPE, the same ids: checked against sentencepiece itself in the tests), which needs the `sentencepiece` and `protobuf`
packages at conversion time. Without them `ivl convert` copies the tokenizer files as they are and says so.
Either way the result names InternVL's image tokens (for transformers' InternVL processor) and carries a chat
template: the tokenizer's own, else the one the original config names (`template`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerBase

from ivl.model.load import ModelLoadError

IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": IMAGE_CONTEXT_TOKEN}
INTERNLM2_TOKENIZERS = ("InternLM2Tokenizer", "InternLM2TokenizerFast")
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


def _tokenizer_config(path: Path) -> dict[str, Any]:
    file = path / "tokenizer_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def token_id_from_files(path: Path, token: str) -> int | None:
    """The id of `token` read from the tokenizer files alone (no tokenizer class, no remote code)."""
    candidates: dict[str, int] = {}
    if (path / "tokenizer.json").is_file():
        added = json.loads((path / "tokenizer.json").read_text()).get("added_tokens", [])
        candidates.update({entry["content"]: entry["id"] for entry in added})
    decoder = _tokenizer_config(path).get("added_tokens_decoder", {})
    candidates.update({entry["content"]: int(index) for index, entry in decoder.items()})
    if (path / "added_tokens.json").is_file():
        candidates.update(json.loads((path / "added_tokens.json").read_text()))
    return candidates.get(token)


def _missing_sentencepiece() -> list[str]:
    missing = []
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        missing.append("sentencepiece")
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        missing.append("protobuf")
    return missing


def internlm2_fast_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """InternLM2's sentencepiece tokenizer as a LLaMA-style fast tokenizer with the same ids."""
    missing = _missing_sentencepiece()
    if missing:
        raise ModelLoadError(
            f"{path / 'tokenizer.model'} is InternLM2's sentencepiece tokenizer (remote code); turning it into a fast "
            f"tokenizer needs {' and '.join(missing)} (pip install sentencepiece protobuf), or trust_remote_code"
        )
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString((path / "tokenizer.model").read_bytes())
    # InternLM2Tokenizer runs sentencepiece on each piece of text between special tokens, adding a dummy "▁" prefix
    # to each only if the model says so: prepend_scheme "always" (legacy) or "never".
    return LlamaTokenizer.from_pretrained(
        path,
        add_prefix_space=proto.normalizer_spec.add_dummy_prefix,
        legacy=True,
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens=IMAGE_TOKENS,
    )


def load_original_tokenizer(path: Path, template: str | None, trust_remote_code: bool = False):
    """The tokenizer of an original checkpoint, without remote code where possible (see the module docstring)."""
    tokenizer_class = _tokenizer_config(path).get("tokenizer_class")
    try:
        if tokenizer_class in INTERNLM2_TOKENIZERS and not trust_remote_code:
            tokenizer = internlm2_fast_tokenizer(path)
        else:
            # An empty model config: the tokenizer files name their class; the original config.json is not for
            # transformers' AutoConfig (and would import its remote code under trust_remote_code).
            tokenizer = AutoTokenizer.from_pretrained(
                path,
                config=PreTrainedConfig(),
                trust_remote_code=trust_remote_code,
                extra_special_tokens=IMAGE_TOKENS,
            )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {error}") from error
    if IMAGE_CONTEXT_TOKEN not in tokenizer.get_vocab():
        raise ModelLoadError(f"the tokenizer of {path} has no {IMAGE_CONTEXT_TOKEN} token: it is not an InternVL one")
    if not tokenizer.chat_template and template:
        tokenizer.chat_template = named_template(template)
    return tokenizer


def named_template(name: str) -> str | None:
    """The Jinja chat template of one of InternVL's conversation templates (None for a name the kit does not know)."""
    from ivl.data.chat import NAMED_TEMPLATES

    return NAMED_TEMPLATES[name].jinja if name in NAMED_TEMPLATES else None


def save_hf_tokenizer(src: Path, dst: Path, template: str | None) -> list[str]:
    """Write the tokenizer of original checkpoint `src` to HF checkpoint `dst`; returns notes for the user."""
    try:
        tokenizer = load_original_tokenizer(src, template)
    except ModelLoadError as error:
        if "sentencepiece" not in str(error):
            raise
        _copy_tokenizer_files(src, dst)
        return [f"tokenizer copied as it is, not converted: {error}"]
    tokenizer.save_pretrained(dst)
    _edit_tokenizer_config(dst, drop=("auto_map",))  # the remote-code tokenizer it names is no longer needed
    return []


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def save_original_tokenizer_from(src: Path, dst: Path) -> list[str]:
    """Write the tokenizer of HF checkpoint `src` to original checkpoint `dst`; returns notes for the user. A tokenizer
    transformers cannot load without remote code (one `ivl convert` copied as it was) is copied back as it is."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    except (OSError, ValueError) as error:
        _copy_tokenizer_files(src, dst)
        return [f"tokenizer copied as it is (transformers cannot load it without remote code: {error})"]
    save_original_tokenizer(tokenizer, dst)
    return []


def save_original_tokenizer(tokenizer: PreTrainedTokenizerBase, dst: Path) -> None:
    """Write `tokenizer` for an original checkpoint, whose remote code runs on transformers 4.x: the chat template
    inside tokenizer_config.json (older releases do not read chat_template.jinja), and the generic fast class name in
    place of the v5-only `TokenizersBackend` (both load the same tokenizer.json)."""
    tokenizer.save_pretrained(dst, save_jinja_files=False)
    config = _tokenizer_config(dst)
    if config.get("tokenizer_class") == "TokenizersBackend":
        _edit_tokenizer_config(dst, set_values={"tokenizer_class": "PreTrainedTokenizerFast"})


def _edit_tokenizer_config(path: Path, drop: tuple[str, ...] = (), set_values: dict[str, Any] | None = None) -> None:
    file = path / "tokenizer_config.json"
    config = {key: value for key, value in json.loads(file.read_text()).items() if key not in drop}
    file.write_text(json.dumps({**config, **(set_values or {})}, indent=2, ensure_ascii=False) + "\n")
