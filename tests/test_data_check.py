"""`ivl data check`: every bad-row kind is reported with its line number, exit 1; clean data exits 0."""

import json
import struct
import zlib

import pytest
from PIL import Image

from ivl.cli import main
from ivl.data.shapes import write_dataset


def png_header_only(path, width, height):
    """A PNG whose header claims width x height (a decompression bomb as far as any reader can tell)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def turn(question, answer="A"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def bad_file(tmp_path):
    Image.new("RGB", (448, 448), "white").save(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    png_header_only(tmp_path / "bomb.png", 12000, 12000)
    rows = [
        json.dumps({"image": "ok.png", "conversations": turn("<image>\nfine")}),  # 1: OK
        '{"image": "ok.png", "conversations": [',  # 2: bad JSON
        json.dumps({"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]}),  # 3
        json.dumps({"image": ["ok.png", "ok.png"], "conversations": turn("<image>\none")}),  # 4
        json.dumps({"image": "ok.png", "conversations": turn("<image>\nQ", "")}),  # 5: empty text
        json.dumps({"image": "gone.png", "conversations": turn("<image>\nQ")}),  # 6: missing image
        json.dumps({"image": "broken.jpg", "conversations": turn("<image>\nQ")}),  # 7: unreadable
        json.dumps({"image": "ok.png", "conversations": turn("<image>\n" + "long " * 3000)}),  # 8: too long
        json.dumps({"image": "bomb.png", "conversations": turn("<image>\nQ")}),  # 9: too large
        json.dumps({"conversations": turn("text only", "no no no no no no " * 10)}),  # 10: OK, flagged
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_every_bad_row_kind_is_reported_with_its_line(bad_file, capsys):
    assert main(["data", "check", str(bad_file), "data.max_length=2048"]) == 1
    out = capsys.readouterr().out
    assert "2 rows OK, 8 bad, 1 flagged" in out
    expected = {
        2: "bad JSON",
        3: "no assistant turn",
        4: "1 <image> placeholder(s) but 2 image(s)",
        5: "empty assistant turn",
        6: "image not found",
        7: "unreadable image",
        8: "over max_length 2048",
        9: "too large",
    }
    for line, reason in expected.items():
        assert any(f"bad.jsonl:{line}: " in row and reason in row for row in out.splitlines()), (line, out)
    assert "bad.jsonl:10: flagged: repetitive 3-gram" in out


def test_resolved_config_is_printed_with_overrides_applied(tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text("model:\n  name_or_path: preset:tiny-112\ndata:\n  max_tiles: 4\noptim:\n  lr: 1e-4\n")
    meta = write_dataset(tmp_path / "shapes", num_train=2, num_validation=1)
    assert main(["data", "check", str(meta), "--config", str(config), "data.max_length=512", "--show-config"]) == 0
    out = capsys.readouterr().out
    assert "name_or_path: preset:tiny-112" in out and "max_tiles: 4" in out and "max_length: 512" in out
    assert "112 px tiles, 16 tokens per tile" in out


def test_json_report_and_clean_demo_data(tmp_path, capsys):
    meta = write_dataset(tmp_path / "shapes", num_train=12, num_validation=4, width=448, height=336)
    assert main(["data", "check", str(meta), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows_ok"] == 12 and report["rows_bad"] == 0
    assert report["tiles_histogram"] == {"7": 12}  # 448x336 at max 6 tiles: 3x2 grid + thumbnail


def test_cli_errors_are_one_line_messages_not_tracebacks(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "none.jsonl")]) == 1
    assert "cannot open the annotation file" in capsys.readouterr().out
    assert main(["data", "check", "x.jsonl", "data.max_tiles=zero"]) == 2
    assert capsys.readouterr().err.strip() == "error: data.max_tiles: expected a number, got 'zero'"
    bad_meta = tmp_path / "meta.json"
    bad_meta.write_text(json.dumps({"a": {"annotation": "a.jsonl", "repeat_time": -1}}))
    assert main(["data", "check", str(bad_meta)]) == 1
    assert "repeat_time must be a positive number" in capsys.readouterr().out
