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


def test_pipeline_rejects_batching_and_returns_every_sequence(tmp_path):
    from transformers import pipeline

    from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration
    from qtsplus_hf.tiny import tiny_qtsplus_config

    torch.manual_seed(0)
    model = QTSplusQwen2_5_VLForConditionalGeneration(tiny_qtsplus_config()).eval()
    pipe = pipeline("video-text-to-text", model=model, processor=tiny_processor())
    path = write_mp4(tmp_path / "v.mp4", 12, 6)
    with pytest.raises(ValueError, match="batch_size > 1 is not supported"):
        pipe([{"video": path, "text": QUESTION}] * 2, batch_size=2)
    results = pipe(video=path, text=QUESTION, max_new_tokens=2, do_sample=True, num_return_sequences=3,
                   return_dict_in_generate=True)
    assert isinstance(results, list) and len(results) == 3
    assert all(result["qtsplus"]["kept"] <= result["qtsplus"]["total"] for result in results)
