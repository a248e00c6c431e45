"""QTSplusProcessor's question mask, and pipeline("video-text-to-text") from a saved folder."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from qtsplus_hf.tiny import tiny_processor

from conftest import write_mp4


QUESTION = "What colour is the circle?"


def test_query_mask_covers_exactly_the_question_in_a_chat():
    processor = tiny_processor()
    messages = [
        {"role": "system", "content": "You are a helpful assistant. Answer with one word."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "text", "text": "How many times?"}]},
    ]
    video = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], videos=[video], return_tensors="pt")
    ids, mask = inputs["input_ids"][0], inputs["qtsplus_query_mask"][0]
    expected = processor.tokenizer(QUESTION)["input_ids"] + processor.tokenizer("How many times?")["input_ids"]
    assert ids[mask].tolist() == expected
    assert not mask[ids == processor.video_token_id].any()


def test_apply_chat_template_tokenized_carries_the_mask_and_batches_pad_left():
    processor = tiny_processor()
    conversations = [
        [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Which object appears first?"}]}],
    ]
    inputs = processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, add_generation_prompt=True, padding=True, return_tensors="pt"
    )
    decoded = [processor.tokenizer.decode(row[mask]) for row, mask in zip(inputs["input_ids"], inputs["qtsplus_query_mask"])]
    assert decoded == [QUESTION, "Which object appears first?"]
    assert not inputs["qtsplus_query_mask"][inputs["attention_mask"] == 0].any()


def chat_video_inputs(processor, system: str) -> dict:
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "text", "text": "How many times?"}]},
    ]
    video = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt], videos=[video], return_tensors="pt")


def test_without_a_query_mask_the_model_scores_by_the_user_turns_alone():
    """The model's own rule (no `qtsplus_query_mask`) finds what the processor marks, by token ids alone: the system
    prompt, role markers and the assistant's turn are left out, so changing the system prompt changes nothing."""
    from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration
    from qtsplus_hf.selector_qtsplus import question_mask
    from qtsplus_hf.tiny import tiny_qtsplus_config

    processor = tiny_processor()
    torch.manual_seed(0)
    model = QTSplusQwen2_5_VLForConditionalGeneration(tiny_qtsplus_config(**processor.chat_turn_settings())).eval()
    inputs = chat_video_inputs(processor, "You are a helpful assistant. Answer with one word.")
    processor_mask = inputs.pop("qtsplus_query_mask")
    assert torch.equal(question_mask(inputs["input_ids"], inputs["attention_mask"], None, None, model.config), processor_mask)

    other_system = dict(chat_video_inputs(processor, "Describe the scene in great detail, please."))
    other_system.pop("qtsplus_query_mask")
    scores = [model.select(**batch).scores[0] for batch in (inputs, other_system)]
    assert torch.equal(scores[0], scores[1])
    # The previous rule (every attended non-vision token), what a model without the chat settings falls back to,
    # lets the system prompt vote:
    fallback = QTSplusQwen2_5_VLForConditionalGeneration(tiny_qtsplus_config(qtsplus_user_turn_ids=[7, 7, 7])).eval()
    fallback.load_state_dict(model.state_dict())
    assert not torch.equal(*[fallback.select(**batch).scores[0] for batch in (inputs, other_system)])


def test_plain_text_without_chat_markers_is_all_question():
    processor = tiny_processor()
    inputs = processor(text=["<|vision_start|><|video_pad|><|vision_end|>" + QUESTION],
                       videos=[np.zeros((2, 16, 16, 3), dtype=np.uint8)], return_tensors="pt")
    assert processor.tokenizer.decode(inputs["input_ids"][0][inputs["qtsplus_query_mask"][0]]) == QUESTION


def test_pipeline_in_process_answers_like_generate(tmp_path, converted_model):
    from transformers import pipeline

    from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration
    from qtsplus_hf.pipeline_video_text_to_text import video_question_inputs
    from qtsplus_hf.tiny import tiny_qtsplus_config

    torch.manual_seed(0)
    model = QTSplusQwen2_5_VLForConditionalGeneration(tiny_qtsplus_config()).eval()
    processor = tiny_processor()
    path = write_mp4(tmp_path / "v.mp4", 30, 10)
    pipe = pipeline("video-text-to-text", model=model, processor=processor)
    result = pipe(video=path, text=QUESTION, max_new_tokens=4, do_sample=False, qtsplus_keep_ratio=0.5)
    inputs, _, _ = video_question_inputs(processor, path, QUESTION)
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, qtsplus_keep_ratio=0.5)
    expected = processor.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert result["generated_text"] == expected
    total = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert result["qtsplus"]["total"] == total and result["qtsplus"]["kept"] == -(-total // 2)
    with pytest.raises(ValueError, match="question is empty"):
        pipe(video=path, text="  ")


def test_pipeline_from_a_saved_folder_without_the_package(tmp_path, tiny_checkpoint):
    videos = [write_mp4(tmp_path / f"v{i}.mp4", n, fps, w, h, seed=i)
              for i, (n, fps, w, h) in enumerate([(30, 10, 64, 48), (9, 3, 40, 56)])]
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["qtsplus_hf"] = None
        from transformers import AutoModel, AutoProcessor, pipeline
        folder, videos = {tiny_checkpoint!r}, {videos!r}
        pipe = pipeline("video-text-to-text", model=folder, trust_remote_code=True)
        results = pipe([{{"video": v, "text": {QUESTION!r}}} for v in videos], max_new_tokens=4, do_sample=False)
        # the same through the Auto classes and generate, by hand
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        module = sys.modules[type(pipe).__module__]
        expected = []
        for v in videos:
            inputs, _, metadata = module.video_question_inputs(processor, v, {QUESTION!r})
            tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            expected.append(processor.batch_decode(tokens[:, inputs["input_ids"].shape[1]:],
                                                   skip_special_tokens=True)[0])
        print(json.dumps({{"pipeline": type(pipe).__name__, "processor": type(processor).__name__,
                           "results": results, "expected": expected}}))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["pipeline"] == "QTSplusVideoTextToTextPipeline" and report["processor"] == "QTSplusProcessor"
    for result, expected, duration in zip(report["results"], report["expected"], [3.0, 3.0]):
        assert result["generated_text"] == expected
        stats = result["qtsplus"]
        assert 1 <= stats["kept"] <= stats["total"] and stats["ratio"] == pytest.approx(stats["kept"] / stats["total"])
        assert stats["kept_seconds"] and all(0 <= second < duration for second in stats["kept_seconds"])


def test_unpadded_python_lists_get_a_mask_per_row():
    processor = tiny_processor()
    inputs = processor(text=["What colour?", "Which object appears first?"])
    assert [len(mask) for mask in inputs["qtsplus_query_mask"]] == [len(ids) for ids in inputs["input_ids"]]
    assert all(all(mask) for mask in inputs["qtsplus_query_mask"])


def test_pipeline_batches_videos_with_the_results_of_one_at_a_time(tmp_path):
    """Videos of different lengths and questions, batched (left padding), answer exactly as one at a time, at a
    fixed keep ratio and at the predicted budget, and `num_return_sequences` still gives every sequence."""
    from transformers import pipeline

    from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration
    from qtsplus_hf.selector_qtsplus import question_mask
    from qtsplus_hf.tiny import tiny_qtsplus_config

    torch.manual_seed(0)
    model = QTSplusQwen2_5_VLForConditionalGeneration(tiny_qtsplus_config()).eval()
    pipe = pipeline("video-text-to-text", model=model, processor=tiny_processor())
    questions = [QUESTION, "Which object appears first?", "How many times does the square appear?"]
    samples = [{"video": write_mp4(tmp_path / f"v{i}.mp4", frames, 6, seed=i), "text": question}
               for i, (frames, question) in enumerate(zip([12, 30, 18], questions))]
    for settings in ({"qtsplus_keep_ratio": 0.4}, {}):
        one_at_a_time = pipe(samples, max_new_tokens=6, do_sample=False, **settings)
        assert len({result["qtsplus"]["total"] for result in one_at_a_time}) == 3  # the videos differ in length
        for batch_size in (2, 3):
            batched = pipe(samples, batch_size=batch_size, max_new_tokens=6, do_sample=False, **settings)
            assert [r["generated_text"] for r in batched] == [r["generated_text"] for r in one_at_a_time]
            for got, expected in zip(batched, one_at_a_time):
                rho = got["qtsplus"].pop("rho"), expected["qtsplus"].pop("rho")
                assert got["qtsplus"] == expected["qtsplus"]  # kept count, total, ratio and the kept seconds
                assert rho[0] == pytest.approx(rho[1], abs=1e-6)  # float rounding of a padded batch at most
                expected["qtsplus"]["rho"] = rho[1]
    results = pipe(samples[0], max_new_tokens=2, do_sample=True, num_return_sequences=3)
    assert isinstance(results, list) and len(results) == 3
    assert all(result["qtsplus"]["kept"] <= result["qtsplus"]["total"] for result in results)
    batched = pipe(samples, batch_size=2, max_new_tokens=2, do_sample=True, num_return_sequences=3)
    assert [len(result) for result in batched] == [3, 3, 3]


def test_the_processor_on_media_alone_gives_the_media_outputs():
    # vLLM calls the processor with the videos only: no text, so no question mask, and no error.
    import numpy as np

    from qtsplus_hf.tiny import tiny_processor

    frames = np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    outputs = tiny_processor()(videos=[frames], do_sample_frames=False, return_tensors="pt")
    assert outputs["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert "qtsplus_query_mask" not in outputs and "input_ids" not in outputs
