"""InternVL3.5 thinking mode: training ids and labels equal what transformers' chat templates render, for rows that
think and rows that do not; generation prompts switch thinking on (system prompt) and off (empty think block)."""

import json

import pytest

from ivl.data.chat import (
    EMPTY_THINK,
    IGNORE_INDEX,
    NAMED_TEMPLATES,
    THINKING_SYSTEM_PROMPT,
    ChatTemplate,
    Conversation,
    ConversationTokenizer,
    SampleError,
    thinks,
)
from ivl.model.presets import load_demo_tokenizer

# A Qwen3-style chat template, written for this test from Qwen3's documented rendering (tools left out): a reply's
# reasoning is taken from its `<think>...</think>` opening; replies after the last question are rendered with a think
# block (an empty one when they carry no reasoning), earlier replies without their reasoning; a generation prompt with
# enable_thinking=False ends with the empty think block.
QWEN3_STYLE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

REASONED = "<think>\nThere are two circles and one square.\n</think>\n\nThree."
PLAIN = "Three."


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = load_demo_tokenizer()
    tokenizer.chat_template = QWEN3_STYLE
    return tokenizer


def _tokenize(tokenizer, template, messages):
    chat = ConversationTokenizer(tokenizer, template, tokens_per_tile=4)
    return chat(Conversation([dict(m) for m in messages]), [])


def _reference_ids(tokenizer, messages, template=None):
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    return tokenizer(text, add_special_tokens=True)["input_ids"], text


def _supervised_text(tokenizer, ids, labels):
    """The supervised tokens, decoded as maximal runs."""
    runs, current = [], []
    for token, label in zip(ids.tolist(), labels.tolist(), strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([tokenizer.decode(current)] if current else [])


QUESTION = {"role": "user", "content": "How many shapes?"}


def test_a_row_without_reasoning_is_trained_to_answer_after_an_empty_think_block(tokenizer):
    messages = [QUESTION, {"role": "assistant", "content": PLAIN}]
    ids, labels = _tokenize(tokenizer, ChatTemplate("tokenizer", None, None), messages)
    expected, text = _reference_ids(tokenizer, messages)
    assert ids.tolist() == expected
    assert EMPTY_THINK + PLAIN in text
    assert _supervised_text(tokenizer, ids, labels) == [EMPTY_THINK + PLAIN + "<|im_end|>"]
    assert not thinks(messages)


def test_a_row_with_reasoning_is_supervised_as_written_under_the_thinking_system_prompt(tokenizer):
    messages = [QUESTION, {"role": "assistant", "content": REASONED}]
    ids, labels = _tokenize(tokenizer, ChatTemplate("tokenizer", None, None), messages)
    expected, text = _reference_ids(tokenizer, [{"role": "system", "content": THINKING_SYSTEM_PROMPT}, *messages])
    assert ids.tolist() == expected and text.startswith("<|im_start|>system\n" + THINKING_SYSTEM_PROMPT)
    assert _supervised_text(tokenizer, ids, labels) == [REASONED + "<|im_end|>"]
    assert thinks(messages)


def test_multi_turn_rows_supervise_each_reply_as_the_whole_conversation_renders_it(tokenizer):
    messages = [QUESTION, {"role": "assistant", "content": REASONED}, {"role": "user", "content": "And squares?"},
                {"role": "assistant", "content": "One."}]  # fmt: skip
    ids, labels = _tokenize(tokenizer, ChatTemplate("tokenizer", None, None), messages)
    expected, _ = _reference_ids(tokenizer, [{"role": "system", "content": THINKING_SYSTEM_PROMPT}, *messages])
    assert ids.tolist() == expected
    # Qwen3 drops the reasoning of replies before the last question; the last reply gets the empty think block.
    assert _supervised_text(tokenizer, ids, labels) == ["Three.<|im_end|>", EMPTY_THINK + "One.<|im_end|>"]


def test_named_internvl3_5_template_renders_both_modes_like_transformers(tokenizer):
    template = NAMED_TEMPLATES["internvl3_5"]
    for content, thinking in ((PLAIN, False), (REASONED, True)):
        messages = [QUESTION, {"role": "assistant", "content": content}]
        ids, labels = _tokenize(tokenizer, template, messages)
        system = [{"role": "system", "content": THINKING_SYSTEM_PROMPT}] if thinking else []
        expected, _ = _reference_ids(tokenizer, [*system, *messages], template.jinja)
        assert ids.tolist() == expected
        written = content if thinking else EMPTY_THINK + content
        assert _supervised_text(tokenizer, ids, labels) == [written + "<|im_end|>"]


@pytest.mark.parametrize("template", [ChatTemplate("tokenizer", None, None), NAMED_TEMPLATES["internvl3_5"]])
def test_generation_prompts_switch_thinking_on_and_off(tokenizer, template):
    chat = ConversationTokenizer(tokenizer, template, tokens_per_tile=4)
    conversation = Conversation([dict(QUESTION)])
    off = tokenizer.decode(chat.prompt(conversation, [], thinking=False))
    on = tokenizer.decode(chat.prompt(conversation, [], thinking=True))
    assert off.endswith("<|im_start|>assistant\n" + EMPTY_THINK)
    assert THINKING_SYSTEM_PROMPT in on and on.endswith("<|im_start|>assistant\n")
    assert THINKING_SYSTEM_PROMPT not in off


def test_malformed_reasoning_is_one_clear_error(tokenizer):
    for content in ("Three.</think>", "<think>a</think><think>b</think>x", "x<think>a</think>y"):
        with pytest.raises(SampleError, match="reasoning must open"):
            thinks([QUESTION, {"role": "assistant", "content": content}])
    with pytest.raises(SampleError, match="reasoning belongs to answers"):
        thinks([{"role": "user", "content": "<think>hm</think>"}])


def test_data_check_counts_the_rows_that_think(tmp_path, capsys):
    from ivl.cli import main as cli_main

    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}]}
            for answer in (REASONED, PLAIN, REASONED)]  # fmt: skip
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli_main(["data", "check", str(data), "--json", "data.template=internvl3_5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows_ok"] == 3 and report["rows_thinking"] == 2


def test_templates_without_a_thinking_mode_train_reasoning_rows_as_written(tokenizer):
    messages = [QUESTION, {"role": "assistant", "content": REASONED}]
    template = NAMED_TEMPLATES["internvl2_5"]
    ids, labels = _tokenize(tokenizer, template, messages)
    expected, text = _reference_ids(tokenizer, messages, template.jinja)
    assert ids.tolist() == expected and THINKING_SYSTEM_PROMPT not in text
    assert _supervised_text(tokenizer, ids, labels) == [REASONED + "<|im_end|>"]
