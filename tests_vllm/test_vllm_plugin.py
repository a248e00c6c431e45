"""The vLLM plugin against the HF model: same weights, same inputs, the same greedy tokens and kept tokens."""

import math
from importlib.metadata import entry_points

import pytest

from conftest import QUESTIONS, KeptIndexRecorder, chat_prompt, greedy, hf_greedy, numpy_image, numpy_video, serve


def test_the_entry_point_registers_the_architecture():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins["qtsplus"] == "qtsplus_hf.vllm_plugin:register"
    load_general_plugins()
    assert "QTSplusQwen2_5_VLForConditionalGeneration" in ModelRegistry.get_supported_archs()


@pytest.fixture(scope="module")
def requests(checkpoint):
    """Three requests: two videos, the first asked twice (a second question on a video the cache has seen)."""
    videos = [numpy_video(0), numpy_video(1), numpy_video(0)]
    return [(chat_prompt(checkpoint, question), video) for question, video in zip(QUESTIONS, videos)]


@pytest.fixture(scope="module")
def keep_all_engine(checkpoint):
    llm = serve(checkpoint)
    yield llm
    del llm


@pytest.fixture(scope="module")
def quarter_engine(checkpoint):
    llm = serve(checkpoint, keep_ratio=0.25)
    yield llm
    del llm


def test_keep_1_serves_the_hf_models_greedy_tokens(checkpoint, requests, keep_all_engine):
    with KeptIndexRecorder(keep_all_engine) as recorder:
        served = greedy(keep_all_engine, requests)
    for (prompt, video), got in zip(requests, served):
        expected = hf_greedy(checkpoint, prompt, video, keep_ratio=1.0)
        assert got["prompt_length"] == expected["prompt_length"]
        assert got["tokens"] == expected["tokens"]
    assert all(len(kept) == 64 for kept in recorder.kept)  # every token, 4 x 4 x 4 per video


def test_keep_a_quarter_serves_the_hf_models_selection_and_tokens(checkpoint, requests, quarter_engine):
    with KeptIndexRecorder(quarter_engine) as recorder:
        served = greedy(quarter_engine, requests)
    expected = [hf_greedy(checkpoint, prompt, video, keep_ratio=0.25) for prompt, video in requests]
    for got, reference in zip(served, expected):
        kept = math.ceil(0.25 * reference["num_video_tokens"])
        assert len(reference["kept"]) == kept
        # the placeholders are the kept tokens only: the prompt is the HF prompt less the dropped tokens
        assert got["prompt_length"] == reference["prompt_length"] - reference["num_video_tokens"] + kept
        assert got["tokens"] == reference["tokens"]
    # The selector kept the HF model's tokens for each (video, question), the same video differently per question.
    assert sorted(recorder.kept) == sorted(reference["kept"] for reference in expected)
    assert expected[0]["kept"] != expected[2]["kept"]
    # Dropping tokens changed the answer: equal tokens are not the keep-1.0 path's by accident.
    assert expected[0]["tokens"] != hf_greedy(checkpoint, *requests[0], keep_ratio=1.0)["tokens"]


@pytest.mark.parametrize("engine", ["keep_all_engine", "quarter_engine"])
def test_a_request_in_a_batch_gets_what_it_gets_alone(checkpoint, engine, request):
    # Fresh videos, so the batch is selected afresh: keep 1.0 encodes its videos (questions of different lengths)
    # in one call, keep 0.25 one at a time. Alone, each is what the HF model gives it alone, and vLLM's too.
    llm, keep_ratio = request.getfixturevalue(engine), {"keep_all_engine": 1.0, "quarter_engine": 0.25}[engine]
    batch = [(chat_prompt(checkpoint, question), numpy_video(10 + seed)) for seed, question in enumerate(QUESTIONS)]
    with KeptIndexRecorder(llm) as recorder:
        together = greedy(llm, batch)
    assert len(recorder.kept) == len(batch)
    for (prompt, video), got in zip(batch, together):
        assert got["tokens"] == hf_greedy(checkpoint, prompt, video, keep_ratio=keep_ratio)["tokens"]
    assert [greedy(llm, [each])[0] for each in batch] == together

def test_the_cache_key_holds_the_question(checkpoint, quarter_engine):
    video = numpy_video(5)
    with KeptIndexRecorder(quarter_engine) as recorder:
        first = greedy(quarter_engine, [(chat_prompt(checkpoint, QUESTIONS[0]), video)])
        assert len(recorder.kept) == 1
        # the same video and question again: vLLM's encoder cache answers, the selector does not run
        assert greedy(quarter_engine, [(chat_prompt(checkpoint, QUESTIONS[0]), video)]) == first
        assert len(recorder.kept) == 1
        # the same video with another question is selected afresh, as the HF model selects it
        second_prompt = chat_prompt(checkpoint, QUESTIONS[1])
        second = greedy(quarter_engine, [(second_prompt, video)])
    assert len(recorder.kept) == 2 and recorder.kept[0] != recorder.kept[1]
    reference = hf_greedy(checkpoint, second_prompt, video, keep_ratio=0.25)
    assert recorder.kept[1] == reference["kept"] and second[0]["tokens"] == reference["tokens"]


def test_an_image_before_the_video_keeps_transformers_positions(checkpoint, quarter_engine):
    prompt, video, image = chat_prompt(checkpoint, QUESTIONS[0], with_image=True), numpy_video(3), numpy_image(3)
    reference = hf_greedy(checkpoint, prompt, video, keep_ratio=0.25, image=image)
    assert greedy(quarter_engine, [(prompt, video, image)])[0]["tokens"] == reference["tokens"]


def test_a_prefill_cut_into_chunks_gets_the_same_tokens(checkpoint, requests):
    from qtsplus_hf.tiny import VIDEO_ID

    step = 24
    llm = serve(checkpoint, keep_ratio=0.25, enable_chunked_prefill=True, max_num_batched_tokens=step,
                max_num_seqs=1, mm_processor_cache_gb=0)
    served = greedy(llm, requests, details=True)
    del llm
    for (prompt, video), got in zip(requests, served):
        slots = [i for i, token in enumerate(got["prompt_ids"]) if token == VIDEO_ID]
        assert slots[0] // step != slots[-1] // step  # the kept tokens arrive in two steps
        assert got["tokens"] == hf_greedy(checkpoint, prompt, video, keep_ratio=0.25)["tokens"]


def test_a_repeated_prompt_from_the_prefix_cache_keeps_its_tokens(checkpoint, requests):
    # Blocks of 32: the repeat takes its video's KV from the prefix cache, so its video is never encoded or selected
    # again and its kept tokens' positions never written; decoding must still continue where the HF model's does.
    llm = serve(checkpoint, keep_ratio=0.25, block_size=32, mm_processor_cache_gb=0, enable_prefix_caching=True)
    prompt, video = requests[0]
    with KeptIndexRecorder(llm) as recorder:
        first, again = greedy(llm, [requests[0]], details=True), greedy(llm, [requests[0]], details=True)
    del llm
    assert again[0]["cached"] >= 64 and len(recorder.kept) == 1
    reference = hf_greedy(checkpoint, prompt, video, keep_ratio=0.25)["tokens"]
    assert first[0]["tokens"] == again[0]["tokens"] == reference

def test_positions_ride_exactly_in_bfloat16():
    import torch

    from qtsplus_hf.vllm_qtsplus import POSITION_BASE, POSITION_DIGITS, positions_as_channels, positions_from_channels

    largest = POSITION_BASE**POSITION_DIGITS - 1
    positions = torch.tensor([[0, 255, 257, 4097, largest], [1, 2, 3, 4, 5], [largest, 0, 129, 16385, 7]])
    assert torch.equal(positions_from_channels(positions_as_channels(positions, torch.bfloat16)), positions)
    with pytest.raises(ValueError, match="beyond"):
        positions_as_channels(positions + 1, torch.bfloat16)


def test_sequential_positions_serve_the_hf_models_tokens(sequential_checkpoint):
    llm = serve(sequential_checkpoint, keep_ratio=0.25)
    requests = [(chat_prompt(sequential_checkpoint, q), numpy_video(seed)) for seed, q in enumerate(QUESTIONS[:2])]
    for (prompt, video), got in zip(requests, greedy(llm, requests)):
        assert got["tokens"] == hf_greedy(sequential_checkpoint, prompt, video, keep_ratio=0.25)["tokens"]
    del llm


def test_a_video_without_a_question_is_refused(quarter_engine):
    prompt = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="no question"):
        greedy(quarter_engine, [(prompt, numpy_video(0))])


def test_disabled_qtsplus_is_vllms_stock_qwen2_5_vl(checkpoint, requests, tmp_path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    from qtsplus_hf import QTSplusProcessor, QTSplusQwen2_5_VLForConditionalGeneration

    # the same tensors, less the selector, in a stock folder
    qtsplus = QTSplusQwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint)
    settings = {key: value for key, value in qtsplus.config.to_dict().items()
                if not key.startswith("qtsplus_") and key not in ("model_type", "auto_map", "architectures")}
    stock = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**settings))
    stock.load_state_dict({k: v for k, v in qtsplus.state_dict().items() if not k.startswith("qtsplus.")})
    stock.config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    stock.save_pretrained(tmp_path)
    processor = QTSplusProcessor.from_pretrained(checkpoint)
    Qwen2_5_VLProcessor(image_processor=processor.image_processor, video_processor=processor.video_processor,
                        tokenizer=processor.tokenizer, chat_template=processor.chat_template).save_pretrained(tmp_path)

    llm = serve(str(tmp_path))
    expected = greedy(llm, requests)
    del llm
    llm = serve(checkpoint, hf_overrides={"qtsplus_enabled": False})
    assert greedy(llm, requests) == expected
    del llm
