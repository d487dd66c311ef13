"""Conversations -> token ids and labels, InternVL style (docs/design/prompt_layout.md).

Every `<image>` becomes `<img>` + `<IMG_CONTEXT>` x (tokens_per_tile * tiles) + `</img>`; only assistant turns are
supervised, including their closing end token (`<|im_end|>`), never the `<|im_start|>assistant\\n` header, the newline
after the end token, or any image token.

All templates are Jinja chat templates, so one mechanism serves both: the tokenizer's own template (HF-native
checkpoints, so training text equals inference text) and InternVL's named templates (`internvl2_5`, `internlm2-chat`,
`Hermes-2`, `phi3-chat`, and `internvl3_5` with thinking mode: see THINKING_SYSTEM_PROMPT). Assistant spans are found
by rendering prefixes of the conversation; the text is tokenized once with one `<IMG_CONTEXT>` per image, which is then
expanded at the id level (cheap, and the count is exact).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from ivl.errors import SampleError  # noqa: F401  re-exported

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IGNORE_INDEX = -100
RESERVED_MARKERS = (IMG_START, IMG_END, IMG_CONTEXT)
# InternVL's grounding markup: special tokens of its tokenizers that its own data writes in the text of both turns
# ("<ref>the cat</ref><box>[[x1, y1, x2, y2]]</box>"). They open no turn and no image slot, so they stay allowed.
GROUNDING_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")

_INTERNVL_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
_INTERNVL2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)


def _chatml(default_system: str) -> str:
    # A system turn always comes first: the conversation's own, else the template's default.
    return (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '" + default_system + "' %}{% endif %}"
        "{{ '<|im_start|>system\n' + system + '<|im_end|>\n' }}"
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


# Thinking mode (InternVL3.5, on Qwen3 / GPT-OSS LLMs): the model reasons inside <think>...</think> before the answer
# when its system prompt asks for it: this one, InternVL3.5's published thinking system prompt (model card, "Thinking
# Mode"). An answer without reasoning is preceded by an empty think block, which is how Qwen3's chat template renders a
# reply that does not think, and what a generation prompt ends with when thinking is switched off.
THINK_START, THINK_END = "<think>", "</think>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
THINKING_SYSTEM_PROMPT = """
You are an AI assistant that rigorously follows this response protocol:
1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and reason \
through the problem step-by-step. Enclose this entire thinking process within <think> and </think> tags.
2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate the \
answer from the think section with a newline.
Ensure that the thinking process is thorough but remains focused on the query. The final answer should be standalone \
and not reference the thinking section.
""".strip()


def _chatml_thinking(default_system: str) -> str:
    """ChatML with InternVL3.5's thinking convention: a reply without a think block gets the empty one, and a
    generation prompt asked not to think (`enable_thinking=False`) ends with it."""
    return (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '" + default_system + "' %}{% endif %}"
        "{{ '<|im_start|>system\n' + system + '<|im_end|>\n' }}"
        "{% for message in messages %}{% set content = message['content'] %}"
        "{% if message['role'] == 'assistant' and '</think>' not in content %}"
        "{% set content = '<think>\n\n</think>\n\n' + content %}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
        "{% endif %}"
    )


def thinks(messages: list[dict[str, str]]) -> bool:
    """Whether a conversation's answers carry reasoning (`<think>...</think>` opening an assistant turn); a malformed
    think block is a SampleError."""
    found = False
    for message in messages:
        content = message["content"]
        if THINK_START not in content and THINK_END not in content:
            continue
        if message["role"] != "assistant":
            raise SampleError(f"{THINK_START} / {THINK_END} in a {message['role']} turn: reasoning belongs to answers")
        if content.count(THINK_START) != 1 or content.count(THINK_END) != 1 or not content.startswith(THINK_START):
            raise SampleError(f"an answer's reasoning must open it as one {THINK_START}...{THINK_END} block")
        found = True
    return found


def _phi3(default_system: str) -> str:
    return (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '" + default_system + "' %}{% endif %}"
        "{{ '<|system|>\n' + system + '<|end|>\n' }}"
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str | None  # None: the tokenizer's own chat template
    end_token: str | None  # the assistant turn's closing token (supervised); None: the tokenizer's eos token


NAMED_TEMPLATES = {
    "internvl2_5": ChatTemplate("internvl2_5", _chatml(_INTERNVL_SYSTEM), "<|im_end|>"),
    "Hermes-2": ChatTemplate("Hermes-2", _chatml(_INTERNVL2_SYSTEM), "<|im_end|>"),
    "internlm2-chat": ChatTemplate("internlm2-chat", _chatml(_INTERNVL2_SYSTEM), "<|im_end|>"),
    "phi3-chat": ChatTemplate("phi3-chat", _phi3(_INTERNVL2_SYSTEM), "<|end|>"),
    "internvl3_5": ChatTemplate("internvl3_5", _chatml_thinking(_INTERNVL_SYSTEM), "<|im_end|>"),
}
TEMPLATE_CHOICES = ("auto", "tokenizer", *NAMED_TEMPLATES)


def resolve_template(name: str, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """`auto`: the tokenizer's own template when it has one (HF-native checkpoints), else `internvl2_5`."""
    if name == "auto":
        name = "tokenizer" if tokenizer.chat_template else "internvl2_5"
    if name == "tokenizer":
        if not tokenizer.chat_template:
            raise ValueError(f"the tokenizer has no chat template; pick one of {', '.join(NAMED_TEMPLATES)}")
        return ChatTemplate("tokenizer", None, None)
    if name not in NAMED_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose from {', '.join(TEMPLATE_CHOICES)}")
    return NAMED_TEMPLATES[name]


@dataclass
class Conversation:
    """One normalised sample: messages with `<image>` / `<video>` placeholders in their text, plus its media."""

    messages: list[dict[str, str]]  # {"role": "system" | "user" | "assistant", "content": str}
    images: list = field(default_factory=list)  # paths (str) or PIL images, in placeholder order
    video_frames: list = field(default_factory=list)  # paths or PIL images of one video's frames


def insert_image_placeholders(conversation: Conversation) -> None:
    """Validate placeholders against the media; an image sample whose text has none gets `<image>\\n` prepended
    to its first user turn (one per image), as InternVL does."""
    for message in conversation.messages:
        for placeholder in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
            if message["role"] != "user" and placeholder in message["content"]:
                raise SampleError(
                    f"{placeholder} in an {message['role']} turn: media belong in user turns (the model would be "
                    "trained to reply with the image's tokens)"
                )
    text = "".join(message["content"] for message in conversation.messages)
    for marker in RESERVED_MARKERS:
        if marker in text:
            raise SampleError(f"text contains the reserved image marker {marker}; write <image> placeholders instead")
    num_placeholders = text.count(IMAGE_PLACEHOLDER)
    num_images = len(conversation.images)
    if num_placeholders == 0 and num_images:
        first_user = next((m for m in conversation.messages if m["role"] == "user"), None)
        if first_user is None:
            raise SampleError("no user turn to attach the image to")
        first_user["content"] = IMAGE_PLACEHOLDER + "\n" + first_user["content"]
    elif num_placeholders != num_images:
        raise SampleError(f"{num_placeholders} <image> placeholder(s) but {num_images} image(s)")
    num_video = text.count(VIDEO_PLACEHOLDER)
    if conversation.video_frames and num_video != 1:
        if num_video == 0:
            first_user = next((m for m in conversation.messages if m["role"] == "user"), None)
            if first_user is None:
                raise SampleError("no user turn to attach the video to")
            first_user["content"] = VIDEO_PLACEHOLDER + "\n" + first_user["content"]
        else:
            raise SampleError(f"{num_video} <video> placeholders but one video")
    elif num_video and not conversation.video_frames:
        raise SampleError("<video> placeholder but no video")


def _with_markers(content: str, num_frames: int) -> str:
    # One <IMG_CONTEXT> per image (expanded after tokenization); a video becomes one line per frame.
    content = content.replace(IMAGE_PLACEHOLDER, f"{IMG_START}{IMG_CONTEXT}{IMG_END}")
    frames = "".join(f"Frame{i + 1}: {IMG_START}{IMG_CONTEXT}{IMG_END}\n" for i in range(num_frames))
    return content.replace(VIDEO_PLACEHOLDER + "\n", frames).replace(VIDEO_PLACEHOLDER, frames)


class ConversationTokenizer:
    """Turns a `Conversation` (with placeholders checked) and its tile counts into input ids and labels."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, tokens_per_tile: int):
        self.tokenizer = tokenizer
        self.template = template
        self.tokens_per_tile = tokens_per_tile
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.end_token = template.end_token or tokenizer.eos_token
        self.control_tokens = _control_token_pattern(tokenizer)
        # A template with a thinking mode (InternVL3.5's, Qwen3-style ones) knows the think block; others do not, and
        # their rows are trained as written, without the thinking system prompt.
        self.thinking_mode = THINK_END in (template.jinja or tokenizer.chat_template or "")
        if not tokenizer.is_fast:
            raise ValueError("a fast tokenizer is required (offsets are used to find the assistant spans)")

    def render(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False, thinking: bool | None = None
    ) -> str:
        """`thinking` (generation prompts): passed to the template as `enable_thinking`; None: left undefined."""
        extra = {} if thinking is None else {"enable_thinking": thinking}
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template.jinja,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )

    def supervised_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of each assistant reply up to and including its end token.

        A reply starts where the conversation up to it, rendered with a generation prompt, ends, and runs through the
        first end token after that in the whole rendering: a template may render an earlier reply differently once
        later turns follow (Qwen3's drops the reasoning of replies before the last question), and what is supervised
        is the reply as the whole conversation renders it."""
        text = self.render(messages)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:index], add_generation_prompt=True)
            end = text.find(self.end_token, len(prefix)) if text.startswith(prefix) else -1
            if end < 0:
                raise SampleError(
                    f"chat template {self.template.name!r} does not render conversations prefix-consistently, so "
                    "assistant turns cannot be located; pick a named template (data.template)"
                )
            spans.append((len(prefix), end + len(self.end_token)))
        return text, spans

    def __call__(self, conversation: Conversation, tiles_per_image: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids, labels), LongTensor[T] each. `tiles_per_image` has one count per image, then per frame."""
        messages = self._marked(conversation)
        if not any(m["role"] == "assistant" for m in messages):
            raise SampleError("no assistant turn: nothing to learn from")
        text, spans = self.supervised_spans(messages)
        encoding = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        supervised = _inside_spans([start for start, _ in encoding["offset_mapping"]], spans)
        return self._expand(encoding["input_ids"], supervised, tiles_per_image)

    def prompt(
        self, conversation: Conversation, tiles_per_image: list[int], thinking: bool | None = None
    ) -> torch.Tensor:
        """The generation prompt (everything up to the assistant's turn) as input ids [T]; a trailing assistant reply
        in `conversation` is left out (it is the reference answer). `thinking`: True asks for reasoning (the thinking
        system prompt unless the conversation has its own), False switches it off (the template's empty think block),
        None leaves the template's default."""
        messages = self._marked(conversation)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise SampleError("a generation prompt must end with a user turn")
        if thinking and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": THINKING_SYSTEM_PROMPT}, *messages]
        text = self.render(messages, add_generation_prompt=True, thinking=thinking)
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        input_ids, _ = self._expand(ids, [False] * len(ids), tiles_per_image)
        return input_ids

    def _marked(self, conversation: Conversation) -> list[dict[str, str]]:
        """The messages with image markers; under a thinking-mode template, a conversation whose answers reason and
        that has no system turn gets the thinking system prompt, which is what switches thinking on."""
        for message in conversation.messages:
            found = sorted(set(self.control_tokens.findall(message["content"])))
            if found:
                raise SampleError(
                    f"the text of a {message['role']} turn contains {', '.join(found)}: control tokens of the "
                    "tokenizer, which would open or close turns or image slots in training; remove them"
                )
        num_frames = len(conversation.video_frames)
        messages = [{"role": m["role"], "content": _with_markers(m["content"], num_frames)}
                    for m in conversation.messages]  # fmt: skip
        if thinks(messages) and self.thinking_mode and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": THINKING_SYSTEM_PROMPT})
        return messages

    def _expand(self, ids, supervised, tiles_per_image) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the single <IMG_CONTEXT> of image i by tokens_per_tile * tiles[i] copies (all unsupervised)."""
        positions = [i for i, token in enumerate(ids) if token == self.image_token_id]
        if len(positions) != len(tiles_per_image):
            raise SampleError(
                f"{len(positions)} image slots in the tokenized text but {len(tiles_per_image)} images/frames "
                f"(is {IMG_CONTEXT} a special token of this tokenizer?)"
            )
        masked = [token if flag else IGNORE_INDEX for token, flag in zip(ids, supervised, strict=True)]
        input_ids: list[int] = []
        labels: list[int] = []
        start = 0
        for position, tiles in zip(positions, tiles_per_image, strict=True):
            count = self.tokens_per_tile * tiles
            input_ids += ids[start:position] + [self.image_token_id] * count
            labels += masked[start:position] + [IGNORE_INDEX] * count
            start = position + 1
        input_ids += ids[start:]
        labels += masked[start:]
        return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def _control_token_pattern(tokenizer: PreTrainedTokenizerBase) -> re.Pattern:
    """Every special token of the tokenizer (the chat markup, end / pad tokens, image markers) except the media
    placeholders, which are replaced before tokenizing, and InternVL's grounding markup. The tokenizer turns any of
    them written in a turn's text into its control id, so such text is refused rather than tokenized."""
    special = set(tokenizer.all_special_tokens) | set(RESERVED_MARKERS)
    special |= {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    special -= {IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, *GROUNDING_TOKENS}
    return re.compile("|".join(re.escape(token) for token in sorted(special, key=len, reverse=True) if token))


def _inside_spans(token_starts: list[int], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token start offset, whether it lies in one of the (sorted, disjoint) spans."""
    flags = []
    span_index = 0
    for start in token_starts:
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        flags.append(span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1])
    return flags


_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def normalise_role(role: str) -> str:
    if role not in _ROLE_ALIASES:
        raise SampleError(f"unknown role {role!r}; expected one of {', '.join(sorted(_ROLE_ALIASES))}")
    return _ROLE_ALIASES[role]
