"""The selection picture shows the frames that matter (kept tokens, evidence), and `qtsplus demo` asks one video
about two different objects, reporting both selections and how much they overlap."""

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from qtsplus_hf.default_model import HELD_OUT_SEED_START, default_model_path, synthetic_options
from qtsplus_hf.demo import asked_shapes, object_boxes, query_sample, run_demo
from qtsplus_hf.evidence import evidence_token_mask
from qtsplus_hf.synthetic import generate_sample
from qtsplus_hf.visualize import frames_to_show, save_selection_png, selection_figure_data


# A hand-built video: 6 temporal patches of 2 frames, a 4x4 patch grid merged 2x2 -> 2x2 = 4 tokens per patch.
GRID, MERGE, TEMPORAL, TOKENS_PER_PATCH = (6, 4, 4), 2, 2, 4


def figure_data(kept_indices, evidence_indices=(), **options):
    frames = np.random.default_rng(0).integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    scores = torch.linspace(0, 1, 6 * TOKENS_PER_PATCH)
    evidence = None
    if evidence_indices:
        evidence = torch.zeros(6 * TOKENS_PER_PATCH, dtype=torch.bool)
        evidence[list(evidence_indices)] = True
    return selection_figure_data(frames, GRID, torch.tensor(kept_indices), scores, MERGE, TEMPORAL, 0.5,
                                 evidence=evidence, **options)


def test_shown_patches_are_exactly_those_with_kept_tokens_or_evidence():
    # kept: tokens 1, 2 (patch 0) and 13 (patch 3); evidence: token 21 (patch 5) and token 3 (patch 0, not kept)
    data = figure_data([1, 2, 13], evidence_indices=[21, 3])
    assert data["shown"].tolist() == [0, 3, 5]
    assert data["kept"].shape == data["evidence"].shape == (6, 2, 2)
    assert data["kept"][0].flatten().tolist() == [False, True, True, False]
    assert data["evidence"][5].flatten().tolist() == [False, True, False, False]
    assert data["evidence"][0].flatten().tolist() == [False, False, False, True]
    assert data["seconds"].tolist() == [0, 0.5, 1, 1.5, 2, 2.5] and len(data["frames"]) == 6
    # without evidence, only the patches holding kept tokens
    assert figure_data([1, 2, 13])["shown"].tolist() == [0, 3]
    assert figure_data([0, 4, 8, 12, 16, 20])["shown"].tolist() == [0, 1, 2, 3, 4, 5]


def test_too_many_patches_keep_the_evidence_then_the_most_kept():
    # kept: 1 token in patch 0, 3 in patch 1, 2 in patch 3; evidence in patch 5 (nothing kept there)
    kept = [0, 4, 5, 6, 12, 13]
    assert figure_data(kept, evidence_indices=[20])["shown"].tolist() == [0, 1, 3, 5]
    assert figure_data(kept, evidence_indices=[20], max_frames_shown=3)["shown"].tolist() == [1, 3, 5]
    assert figure_data(kept, evidence_indices=[20], max_frames_shown=2)["shown"].tolist() == [1, 5]
    assert figure_data(kept, evidence_indices=[20], max_frames_shown=1)["shown"].tolist() == [5]
    # ties on kept tokens: the earlier patch
    assert frames_to_show(np.eye(6, 4, dtype=bool), max_frames_shown=2).tolist() == [0, 1]


def test_evidence_mask_must_match_the_video():
    with pytest.raises(ValueError, match="evidence mask"):
        selection_figure_data(np.zeros((12, 16, 16, 3), np.uint8), GRID, torch.tensor([0]), torch.zeros(24), MERGE,
                              TEMPORAL, 0.5, evidence=torch.zeros(23, dtype=torch.bool))


def test_picture_is_a_png_of_the_returned_size_written_atomically(tmp_path):
    data = figure_data([1, 2, 13], evidence_indices=[21, 3])
    path = tmp_path / "kept.png"
    size = save_selection_png(str(path), data, "a title")
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == size == (200 * 3, 450)  # 3 shown patches
    assert os.listdir(tmp_path) == ["kept.png"]  # no temporary file left
    assert save_selection_png(str(path), figure_data([1]), "no evidence") == (200, 450)


def test_counterfactual_object_boxes_are_the_objects_of_the_asked_shape():
    sample = generate_sample(HELD_OUT_SEED_START, "needle", **synthetic_options())
    assert asked_shapes(sample.question) == [sample.question.split("the ")[1].rstrip("?")]
    shape = asked_shapes(sample.counterfactual_question)
    assert len(shape) == 1 and shape != asked_shapes(sample.question)
    boxes = object_boxes(sample, shape)
    assert len(boxes) == sum(item.shape == shape[0] for item in sample.objects) > 0
    assert object_boxes(sample, asked_shapes(sample.question)) == sample.evidence_boxes


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lines = []
    try:
        result = run_demo(str(tmp_path_factory.mktemp("demo")), model_path=default_model_path(), log=lines.append)
    finally:
        torch.set_num_threads(threads)
    return result, "\n".join(lines)


def test_demo_asks_one_video_about_two_objects(demo):
    result, printed = demo
    assert [task["task"] for task in result["tasks"]] == ["needle", "order", "localisation", "counting"]
    query = result["query_awareness"]
    sample = query_sample(HELD_OUT_SEED_START)
    assert query["seed"] == sample.seed and os.path.isfile(query["video"])
    own, counterfactual = query["own"], query["counterfactual"]
    assert own["question"] == sample.question != counterfactual["question"] == sample.counterfactual_question
    assert own["picture"] != counterfactual["picture"]
    for asked in (own, counterfactual):
        with Image.open(asked["picture"]) as picture:
            assert picture.format == "PNG"
        assert f"question: {asked['question']}" in printed
        assert f"selection picture: {asked['picture']}" in printed
        assert asked["kept_tokens"] == len(asked["kept_indices"]) == len(set(asked["kept_indices"]))
        assert 0 < asked["kept_tokens"] < asked["total_tokens"] == 512
        assert f"vision tokens kept: {asked['kept_tokens']} of {asked['total_tokens']}" in printed
        # the asked object's tokens, recomputed from its boxes
        mask = evidence_token_mask(asked["grid_thw"], asked["second_per_grid"], 2, boxes=asked["object_boxes"])
        assert asked["object_tokens"] == int(mask.sum())
        assert asked["object_tokens_kept"] == int(mask[asked["kept_indices"]].sum())
        assert asked["object_kept"] == (asked["object_tokens_kept"] > 0)
    assert own["object_tokens"] == 1  # the needle fills one cell: one token
    shape = asked_shapes(sample.counterfactual_question)[0]
    assert counterfactual["object_tokens"] == sum(item.shape == shape for item in sample.objects)


def test_printed_kept_seconds_are_those_of_the_returned_selection(demo):
    result, printed = demo
    query = result["query_awareness"]
    lines = re.findall(r"^kept seconds: (.*)$", printed, flags=re.MULTILINE)
    assert len(lines) == 2
    for line, asked in zip(lines, (query["own"], query["counterfactual"])):
        printed_seconds = [float(value) for value in line.split(", ")]
        computed = sorted({index // asked["tokens_per_patch"] * asked["second_per_grid"]
                           for index in asked["kept_indices"]})
        assert printed_seconds == computed == asked["kept_seconds"]


def test_overlap_is_that_of_the_two_kept_index_lists(demo):
    result, printed = demo
    query = result["query_awareness"]
    own, counterfactual = set(query["own"]["kept_indices"]), set(query["counterfactual"]["kept_indices"])
    assert query["overlap"] == {"shared": len(own & counterfactual), "union": len(own | counterfactual),
                                "own": len(own), "counterfactual": len(counterfactual)}
    match = re.search(r"overlap: the two questions share (\d+) of the (\d+) tokens either kept "
                      r"\(own kept (\d+), counterfactual kept (\d+)\)", printed)
    assert match, printed[-2000:]
    assert [int(value) for value in match.groups()] == [
        len(own & counterfactual), len(own | counterfactual), len(own), len(counterfactual)]
