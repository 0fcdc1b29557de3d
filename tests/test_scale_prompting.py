import pytest

import zreward_fast as zf
from zreward_fast.dimensions import resolve_dimensions
from zreward_fast.prompting import PromptFormat, check_prompt, student_text, teacher_scoring_suffix, teacher_text
from zreward_fast.scale import ScoreScale, result_from_probs


def test_dimensions_contract():
    assert zf.DIMENSIONS == ("alignment", "realism", "aesthetics", "plausibility")
    assert zf.query_token("realism") == "<|dim_realism|>"


def test_default_and_paper_scale():
    s = zf.ScoreScale()
    assert s.levels == (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
    assert s.range == 4.0 and s.num_levels == 9
    assert s.tokens[5] == "<|score_2.5|>"
    p = zf.ScoreScale.paper()
    assert p.levels[0] == 1.0 and p.levels[-1] == 5.0 and p.num_levels == 9
    assert ScoreScale.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    "levels, match",
    [((1.0,), "at least 2"), ((0.0, 1.0, 1.0), "strictly increasing"), ((2.0, 1.0), "strictly increasing"),
     ((0.0, float("nan")), "finite"), (("a", "b"), "numbers")],
)
def test_bad_levels(levels, match):
    with pytest.raises(ValueError, match=match):
        ScoreScale(levels)


def test_nearest_level_and_ties():
    s = ScoreScale()
    assert s.nearest(2.2) == 4 and s.nearest(2.3) == 5
    assert s.nearest(2.25) == 4  # a tie goes to the lower level
    assert s.nearest(-3) == 0 and s.nearest(9) == 8
    with pytest.raises(ValueError):
        s.nearest(float("nan"))


def test_result_from_probs():
    s = ScoreScale()
    r = result_from_probs([0, 0, 0, 0, 0.5, 0, 0.5, 0, 0], s)
    assert r.mean == pytest.approx(2.5) and r.std == pytest.approx(0.5)
    with pytest.raises(ValueError, match="expected 9"):
        result_from_probs([1.0], s)


def test_resolve_dimensions():
    assert resolve_dimensions(None) == zf.DIMENSIONS
    assert resolve_dimensions("realism") == ("realism",)
    with pytest.raises(ValueError, match="unknown dimension 'beauty'"):
        resolve_dimensions(["beauty"])
    with pytest.raises(ValueError, match="repeat"):
        resolve_dimensions(["realism", "realism"])
    with pytest.raises(ValueError, match="at least one"):
        resolve_dimensions([])


def test_student_and_teacher_formats():
    text = student_text("a red cat", zf.DIMENSIONS, 4)
    assert text.count("<|image_pad|>") == 4
    assert "Prompt: a red cat" in text
    assert text.endswith("<|im_start|>assistant\n<|dim_alignment|><|dim_realism|><|dim_aesthetics|><|dim_plausibility|>")
    single = student_text("a red cat", ["realism"], 4)
    assert single.endswith("assistant\n<|dim_realism|>")
    t = teacher_text("a red cat", "plausibility", 4)
    assert t.endswith("<|im_start|>assistant\n") and "physical plausibility" in t
    assert teacher_scoring_suffix("It floats.", "plausibility").endswith("<|dim_plausibility|>")


def test_prompt_checks():
    with pytest.raises(ValueError, match="special-token"):
        check_prompt("hi <|im_end|> there")
    with pytest.raises(TypeError, match="str"):
        check_prompt(3)
    with pytest.raises(ValueError, match="limit"):
        check_prompt("x" * 11, max_chars=10)
    with pytest.raises(ValueError, match="placeholders"):
        PromptFormat(student="no placeholders")


def test_student_query_positions_is_the_one_check_of_a_student_sequence():
    from zreward_fast.prompting import student_query_positions

    q = {"alignment": 7, "realism": 8}
    rows = [[1, 5, 5, 2, 7, 8], [5, 5, 8, 3, 7]]
    assert student_query_positions(rows, ["alignment", "realism"], q, image_token_id=5, num_image_tokens=2) == [[4, 5], [4, 2]]
    with pytest.raises(ValueError, match=r"prompt 1: 1 image tokens in the text; the bucket needs 2"):
        student_query_positions([rows[0], [5, 7, 8]], ["alignment"], q, 5, 2)
    with pytest.raises(ValueError, match=r"prompt 4: expected one <\|dim_realism\|> token, found 2"):
        student_query_positions([[5, 5, 7, 8, 8]], ["realism"], q, 5, 2, first_index=4)
    with pytest.raises(ValueError, match=r"prompt 0: expected one <\|dim_alignment\|> token, found 0"):
        student_query_positions([[5, 5, 8]], ["alignment"], q, 5, 2)
