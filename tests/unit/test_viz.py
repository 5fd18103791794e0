import json

import numpy as np
import pytest
import torch

from blip2lib import viz


@pytest.fixture
def log_path(tmp_path):
    path = tmp_path / "log.jsonl"
    recs = [
        {"step": s, "loss": 3.0 / s, "itc_loss": 1.0 / s, "itm_loss": 0.5, "itg_loss": 1.5 / s, "lr": 1e-4}
        for s in range(1, 6)
    ]
    recs.insert(2, {"step": 2, "eval": {"txt_r1": 10.0, "img_r1": 8.0}})
    recs.append({"step": 5, "eval": {"txt_r1": 20.0, "img_r1": 15.0}})
    recs.append({"step": 6, "loss": float("nan"), "itc_loss": 0.1, "skipped": True})
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    return path


def test_read_log_splits_train_and_eval(log_path):
    train, evals = viz.read_log(log_path)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert evals == [{"step": 2, "txt_r1": 10.0, "img_r1": 8.0}, {"step": 5, "txt_r1": 20.0, "img_r1": 15.0}]


def test_loss_curves_one_line_per_term_and_gaps_for_nan(log_path):
    fig = viz.loss_curves(log_path)
    (ax,) = fig.axes
    assert [ln.get_label() for ln in ax.get_lines()] == ["loss", "itc_loss", "itm_loss", "itg_loss"]
    loss = ax.get_lines()[0]
    assert list(loss.get_xdata()) == [1, 2, 3, 4, 5]  # the NaN step 6 is dropped
    np.testing.assert_allclose(loss.get_ydata(), [3.0, 1.5, 1.0, 0.75, 0.6])
    assert list(ax.get_lines()[1].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert len(viz.loss_curves(log_path, terms=["itc_loss"], log_y=True).axes[0].get_lines()) == 1


def test_val_curves_one_axes_per_key(log_path):
    fig = viz.val_curves(log_path, ["txt_r1", "img_r1", "missing"])
    assert len(fig.axes) == 3
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 1, 1]
    np.testing.assert_allclose(fig.axes[1].get_lines()[0].get_ydata(), [8.0, 15.0])
    assert len(fig.axes[2].get_lines()[0].get_xdata()) == 0


def test_image_gallery_accepts_arrays_tensors_and_pil():
    from PIL import Image

    imgs = [np.zeros((8, 8, 3), np.uint8), torch.rand(3, 8, 8), Image.new("RGB", (8, 8), "red"), np.ones((8, 8))]
    fig = viz.image_gallery(imgs, ["a", "b", "c", "d " * 40], titles=["1", "2", "3", "4"], ncols=3)
    assert len(fig.axes) == 4
    assert fig.axes[0].get_title() == "1" and fig.axes[3].get_xlabel().count("\n") <= 3
    assert len(viz.to_png(fig)) > 100
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        viz.image_gallery(imgs[:2], ["x"])


def test_to_hwc_scales_and_transposes():
    chw = torch.full((3, 4, 5), 0.5)
    assert viz._to_hwc(chw).shape == (4, 5, 3)
    np.testing.assert_allclose(viz._to_hwc(np.full((2, 2, 3), 255, np.uint8)), 1.0)


def test_retrieval_examples_grid_and_frame_colours():
    imgs = [np.zeros((6, 6, 3))] * 4
    fig = viz.retrieval_examples(["a red square", "a blue circle"], [imgs, imgs], [[True, False, False, False],
                                 [False, False, True, False]], k=3)  # fmt: skip
    assert len(fig.axes) == 6
    green = fig.axes[0].spines["left"].get_edgecolor()
    red = fig.axes[1].spines["left"].get_edgecolor()
    assert green != red and fig.axes[5].spines["top"].get_edgecolor() == green


def test_attention_maps_one_axes_per_query_plus_image():
    attn = torch.rand(5, 4, 4)  # (Q, h, w)
    fig = viz.attention_maps(np.zeros((16, 16, 3)), attn, ncols=3)
    assert len(fig.axes) == 6
    assert len(fig.axes[0].get_images()) == 1 and len(fig.axes[1].get_images()) == 2
    overlay = fig.axes[1].get_images()[1].get_array()
    assert float(overlay.min()) == 0.0 and float(overlay.max()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(Q, h, w\)"):
        viz.attention_maps(np.zeros((16, 16, 3)), torch.rand(4, 4))


def test_constant_attention_map_does_not_divide_by_zero():
    fig = viz.attention_maps(np.zeros((8, 8, 3)), np.ones((1, 2, 2)))
    assert np.isfinite(np.asarray(fig.axes[1].get_images()[1].get_array())).all()


def test_figures_are_small(log_path):
    assert len(viz.to_png(viz.loss_curves(log_path))) < 150_000


def _all_figures(log_path):
    imgs = [np.zeros((6, 6, 3))] * 4
    return {
        "loss": viz.loss_curves(log_path),
        "val": viz.val_curves(log_path, ["txt_r1", "img_r1", "missing"]),
        "gallery": viz.image_gallery(
            [np.zeros((8, 8, 3))] * 8, [f"what colour is shape {i}? → red" for i in range(8)], titles=["opt"] * 8
        ),  # fmt: skip
        "retrieval": viz.retrieval_examples(
            ["a red square on the left", "a blue circle"],
            [imgs, imgs],
            [[True, False, False, False], [False, False, True, False]],
        ),  # fmt: skip
        "attention": viz.attention_maps(np.zeros((16, 16, 3)), torch.rand(5, 4, 4)),
    }


def test_every_figure_is_legible_at_natural_size_in_a_report_column(log_path):
    """Each figure fits a report column (739 px in an 800 px window: shown unscaled) and no text is under 11 px."""
    import io

    from matplotlib.text import Text
    from PIL import Image

    for name, fig in _all_figures(log_path).items():
        width = Image.open(io.BytesIO(viz.to_png(fig))).size[0]  # drawn now: tick labels exist
        assert width <= 739, name
        sizes = [t.get_fontsize() * 80 / 72 for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert min(sizes) >= 11.0, (name, min(sizes))
        assert viz.min_font_px(fig) == pytest.approx(min(sizes)), name


def test_gallery_captions_are_12_px_and_the_alt_text_lists_them():
    import io

    from PIL import Image

    captions = [f"what colour is shape {i}? → red" for i in range(8)]
    fig = viz.image_gallery([np.zeros((8, 8, 3))] * 8, captions, titles=["opt"] * 8)
    png, meta = viz.png_output(fig)
    assert Image.open(io.BytesIO(png)).size[0] == 704  # 4 tiles × 2.2 in × 80 dpi
    assert [ax.xaxis.label.get_fontsize() * 80 / 72 for ax in fig.axes] == pytest.approx([12.0] * 8)
    assert fig.axes[0].get_xlabel() == "what colour is shape\n0? → red"  # 22 characters a line
    assert meta == {"alt": "8 images with their captions: " + "; ".join(f"opt: {c}" for c in captions) + ".",
                    "min_font_px": 12.0}  # fmt: skip
    assert viz.png_output(fig, alt="mine")[1]["alt"] == "mine"
