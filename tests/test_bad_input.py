"""User mistakes get a ValueError that names the problem, raised before any deep computation."""

import pytest
import torch

from qtsplus_hf.tiny import TEXT_VOCAB


def test_placeholder_count_not_matching_the_features(converted_model, two_sample_batch):
    batch = dict(two_sample_batch, input_ids=two_sample_batch["input_ids"].clone())
    first_video_token = (batch["input_ids"][0] == converted_model.config.video_token_id).nonzero()[0, 0]
    batch["input_ids"][0, first_video_token] = TEXT_VOCAB.start
    with pytest.raises(ValueError, match="video placeholder tokens \\(27\\) do not match the video features \\(28"):
        converted_model(**batch)


def test_empty_question(converted_model, two_sample_batch):
    batch = dict(two_sample_batch, qtsplus_query_mask=two_sample_batch["qtsplus_query_mask"].clone())
    batch["qtsplus_query_mask"][1] = False
    with pytest.raises(ValueError, match=r"question is empty in batch row\(s\) \[1\]"):
        converted_model(**batch)
    with pytest.raises(ValueError, match="question is empty"):
        converted_model.generate(**batch, max_new_tokens=2)


def test_labels_cover_the_whole_question(converted_model, two_sample_batch):
    batch = dict(two_sample_batch)
    labels = batch["input_ids"].clone()  # every token is a label: no question left without leaking the answer
    batch.pop("qtsplus_query_mask")
    with pytest.raises(ValueError, match="question is empty"):
        converted_model(**batch, labels=labels)


def test_query_mask_of_the_wrong_shape(converted_model, two_sample_batch):
    batch = dict(two_sample_batch, qtsplus_query_mask=two_sample_batch["qtsplus_query_mask"][:, 1:])
    with pytest.raises(ValueError, match="qtsplus_query_mask must have the shape of input_ids"):
        converted_model(**batch)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, "half", True])
def test_keep_ratio_out_of_range(converted_model, two_sample_batch, ratio):
    with pytest.raises(ValueError, match="qtsplus_keep_ratio must be None or a number in \\(0, 1\\]"):
        converted_model(**two_sample_batch, qtsplus_keep_ratio=ratio)
    with pytest.raises(ValueError, match="qtsplus_keep_ratio"):
        converted_model.generate(**two_sample_batch, qtsplus_keep_ratio=ratio, max_new_tokens=2)


def test_embeddings_instead_of_ids_with_a_video(converted_model, two_sample_batch):
    batch = dict(two_sample_batch)
    embeds = converted_model.get_input_embeddings()(batch.pop("input_ids"))
    with pytest.raises(ValueError, match="pass input_ids"):
        converted_model(inputs_embeds=embeds, **batch)


def test_video_straddling_two_rows(converted_model, config):
    from qtsplus_hf.tiny import video_prompt_batch

    batch = video_prompt_batch([[(2, 4, 4)], [(2, 4, 4)]], [2, 2], config)
    batch["video_grid_thw"] = torch.tensor([[2, 4, 8]])  # the same patches as one 16-token video over both rows
    batch["second_per_grid_ts"] = batch["second_per_grid_ts"][:1]
    with pytest.raises(ValueError, match="split across batch rows"):
        converted_model(**batch)


def test_select_without_video(converted_model, two_sample_batch):
    batch = dict(two_sample_batch)
    batch.pop("pixel_values_videos")
    with pytest.raises(ValueError, match="select\\(\\) needs pixel_values_videos"):
        converted_model.select(**batch)


def test_pre_encoded_videos_cannot_skip_the_selector(converted_model, two_sample_batch):
    features = converted_model.model.get_video_features(two_sample_batch["pixel_values_videos"],
                                                        two_sample_batch["video_grid_thw"])
    with_pixels = dict(two_sample_batch, mm_encoder_outputs={"video": features})
    without_pixels = {key: value for key, value in with_pixels.items() if key != "pixel_values_videos"}
    for batch in (with_pixels, without_pixels):
        with pytest.raises(ValueError, match="cannot pass through the QTSplus selector"):
            converted_model(**batch)
