"""Word-level caption diffs, checks against a scene, and the HTML fragments built from them."""
from PIL import Image

from diffusion_caption.eval.compare import changed_words, diff_html, scene_check, word_diff
from diffusion_caption.viz.html_views import VariantRow, token_chips, variants_table
from diffusion_caption.world.scenes import Scene, ShapeObject


def test_word_diff_marks_changed_and_removed_words():
    d = word_diff("a red circle on a gray background", "a blue circle on a background")
    assert [(w.word, w.op) for w in d] == [("a", "equal"), ("red", "removed"), ("blue", "changed"), ("circle", "equal"),
                                          ("on", "equal"), ("a", "equal"), ("gray", "removed"), ("background", "equal")]
    assert changed_words("a red circle", "a red circle") == 0
    assert changed_words("a red circle", "a red square") == 2
    html = diff_html("a red circle", "a <b> circle")
    assert html.startswith("a <mark>&lt;b&gt;</mark> circle") and "no longer says: <del>red</del>" in html
    assert "no longer says" not in diff_html("a red circle", "a red circle")
    assert "empty caption" in diff_html("a", "")


def test_scene_check_separates_right_wrong_and_unchecked():
    scene = Scene(objects=[ShapeObject("circle", "red", "large", 40, 64, 23)], background="gray")
    right = scene_check("a large red circle on a gray background", scene)
    assert right.verdict == "right" and set(right.checked) >= {"colour", "shape", "size", "background"}
    wrong = scene_check("a blue circle on a pink background", scene)
    assert wrong.verdict == "wrong" and "colour" in wrong.wrong and "background" in wrong.wrong
    assert "made-up object" in wrong.wrong  # blue is no colour of the scene
    assert scene_check("r r r r", scene).verdict == "unchecked"


def test_token_chips_fold_padding_and_escape():
    html = token_chips(["[CLS]", "<red>", "circle", "[SEP]", "x", "[PAD]", "[PAD]"], [0.5, 0.9, 0.2, 1.0, 0.4, 1, 1])
    assert "&lt;red&gt;" in html and "<red>" not in html
    assert "[PAD] ×2" in html and html.count("[PAD]") == 1
    assert "0.90" in html and "0.20" in html
    assert "opacity:0.45" in html  # the token after [SEP] is faded: it is not part of the caption


def test_variants_table_rows_and_verdicts():
    scene = Scene(objects=[ShapeObject("circle", "red", "large", 40, 64, 23)], background="gray")
    img = Image.new("RGB", (32, 32), (128, 128, 128))
    rows = [VariantRow("original", img, "as given", {"diffusion": "a red circle"}),
            VariantRow("background: pink", img, "re-rendered", {"diffusion": "a blue circle"},
                       html_captions={"diffusion": diff_html("a red circle", "a blue circle")},
                       checks={"diffusion": scene_check("a blue circle", scene)})]
    html = variants_table(rows, ["diffusion"])
    assert html.count("<tr>") == 3  # header + 2 rows
    assert "data:image/png;base64," in html and "✗ wrong: colour" in html and "<mark>blue</mark>" in html
