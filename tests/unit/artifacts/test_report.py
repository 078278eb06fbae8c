"""The run report that every `chattune train` leaves: rendered to HTML here, it opens with its plots,
every image is a PNG that loads, and it holds metrics (before/after), samples, data and config."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import markdown
from PIL import Image

from chattune.artifacts.render import cell
from chattune.commands.train import run_train
from chattune.config import Config, validate


class Outline(HTMLParser):
    """Top-level structure of rendered HTML: (tag, [img srcs inside]) per block, plus all text."""

    def __init__(self):
        super().__init__()
        self.blocks, self.depth, self.text = [], 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            if self.blocks:
                self.blocks[-1][1].append(dict(attrs)["src"])
            return
        if self.depth == 0:
            self.blocks.append((tag, []))
        self.depth += 1

    def handle_endtag(self, tag):
        if tag != "img":
            self.depth -= 1

    def handle_data(self, data):
        self.text.append(data)


def render(path) -> Outline:
    html = markdown.markdown(path.read_text(), extensions=["tables", "fenced_code"])
    outline = Outline()
    outline.feed(html)
    return outline


def check_opens_with_plots(out) -> Outline:
    outline = render(out / "report.md")
    tags = [tag for tag, _ in outline.blocks]
    assert tags[0] == "h1"
    first = outline.blocks[1]
    assert first[0] == "p" and first[1], f"the report should open with a plot, not {first}"
    images = [src for _, srcs in outline.blocks for src in srcs]
    assert "plots/loss.png" in images
    for src in images:
        with Image.open(out / src) as img:
            assert img.format == "PNG" and img.size[0] >= 300 and img.size[1] >= 200
            img.load()  # the whole file decodes
    return outline


def test_report_opens_with_plots_and_compares_before_after(trained_dir):
    outline = check_opens_with_plots(trained_dir)
    text = " ".join(outline.text)
    for section in ("Final metrics", "Sample exchanges", "Data", "Configuration"):
        assert section in [t.strip() for t in outline.text], section
    results = json.loads((trained_dir / "results.json").read_text())
    before, after = results["baseline"]["eval_loss"], results["eval"]["eval_loss"]
    assert after < before
    assert f"{before:.4f} before, {after:.4f} after" in text
    assert "base model" in text and "fine-tuned" in text and "reference" in text
    assert "lr: 0.003" in (trained_dir / "report.md").read_text()


def test_report_without_an_eval_split(model_dir, ultrachat_dir, tmp_path):
    cfg = Config()
    cfg.model.name, cfg.data.dataset, cfg.data.train_split = str(model_dir), str(ultrachat_dir), "train_gen"
    cfg.data.max_train_samples = 16
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.logging_steps, cfg.train.lr = str(tmp_path / "o"), 4, 1, 1e-3
    run_train(validate(cfg))
    outline = check_opens_with_plots(tmp_path / "o")
    text = " ".join(outline.text)
    assert "no evaluation split" in text and "base model" not in text
    assert "Sample exchanges" in text and "training (this run has no evaluation split)" in text


def test_conversation_text_cannot_break_the_page():
    assert cell("<script>x</script> | a\nb") == "&lt;script&gt;x&lt;/script&gt; \\| a<br>b"
