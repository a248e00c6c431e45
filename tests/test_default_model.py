"""The bundled default model: it loads offline through trust_remote_code alone and answers held-out needle questions;
`qtsplus eval --synthetic`; the uniform temporal sampling baseline of the benchmark; lazy training datasets."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from qtsplus_hf.cli import main
from qtsplus_hf.data import VideoQACollator, normalize_row
from qtsplus_hf.default_model import HELD_OUT_SEED_START, default_model_path, synthetic_options
from qtsplus_hf.default_model.benchmark import uniform_rows, uniform_temporal_subsample
from qtsplus_hf.default_model.train import synthetic_row
from qtsplus_hf.evaluation import evaluate_video_qa, normalize_answer
from qtsplus_hf.synthetic import COLOURS, generate_sample
from qtsplus_hf.training import TrainOptions, load_model_and_processor, train


# The first four held-out needle videos (seeds at or above HELD_OUT_SEED_START, never trained on; seed % 4 == 0 is
# the needle task), taken as they come, not chosen by the model's answers.
NEEDLE_SEEDS = tuple(HELD_OUT_SEED_START + 4 * index for index in range(4))


def greedy_replies(raw_rows, max_new_tokens: int) -> list[str]:
    """The bundled model's normalised greedy replies to raw synthetic rows, through the training collator and a
    plain `generate` at the predicted budget: not through `qtsplus_hf.evaluation` or `qtsplus_hf.answering`."""
    model, processor = load_model_and_processor(default_model_path())
    collator = VideoQACollator(processor, with_answers=False)
    replies = []
    for row in raw_rows:
        batch = collator([normalize_row(row)])
        with torch.no_grad():
            sequence = model.eval().generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)[0]
        replies.append(normalize_answer(processor.tokenizer.decode(sequence[batch["input_ids"].shape[1]:],
                                                                   skip_special_tokens=True)))
    return replies


def test_needle_ground_truth_is_the_colour_of_the_evidence_object():
    for seed in NEEDLE_SEEDS:
        sample = generate_sample(seed, "needle", **synthetic_options())
        evidence = [item for item in sample.objects if item.evidence]
        assert len(evidence) == 1 and evidence[0].shape in sample.question
        assert sample.answer == evidence[0].colour
        # the evidence frames really show that colour inside the object's box
        item = evidence[0]
        centre = sample.frames[sample.evidence_frames[0], item.top + item.size // 2, item.left + item.size // 2]
        assert np.abs(centre.astype(int) - np.array(COLOURS[item.colour])).max() <= 30


def test_bundled_checkpoint_loads_offline_without_the_package_and_answers_held_out_needles(tmp_path):
    # The remote code alone loads and runs the committed model offline, at its predicted budget: it answers the first
    # held-out needle questions correctly, as the package's own evaluation does for the same videos.
    model, processor = load_model_and_processor(default_model_path())
    rows = [normalize_row(synthetic_row(seed)) for seed in NEEDLE_SEEDS]
    expected = [p["prediction"] for p in evaluate_video_qa(model, processor, rows).predictions]
    cases = []
    for seed in NEEDLE_SEEDS:
        sample = generate_sample(seed, "needle", **synthetic_options())
        np.save(tmp_path / f"{seed}.npy", sample.frames)
        cases.append({"seed": seed, "prompt": sample.question, "fps": sample.fps, "answer": sample.answer})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np, torch
        sys.modules["qtsplus_hf"] = None  # any import of the package now fails
        from transformers import AutoModel, AutoProcessor
        from transformers.video_utils import VideoMetadata
        folder = {default_model_path()!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        results = []
        for case in json.load(open("cases.json")):
            frames = np.load(f"{{case['seed']}}.npy")
            messages = [{{"role": "user", "content": [{{"type": "video"}}, {{"type": "text", "text": case["prompt"]}}]}}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            metadata = VideoMetadata(total_num_frames=len(frames), fps=case["fps"], width=frames.shape[2],
                                     height=frames.shape[1], frames_indices=list(range(len(frames))))
            inputs = processor(text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                               return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
            reply = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            selection = out["qtsplus"]
            results.append([type(model).__module__.split(".")[0], reply[0], selection.num_kept[0],
                            selection.num_tokens[0]])
        print(json.dumps(results))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for case, (module_root, reply, kept, total) in zip(cases, results):
        assert module_root == "transformers_modules"  # the checkpoint's own code, not the installed package
        assert normalize_answer(reply) == expected.pop(0) == case["answer"], case["seed"]
        assert 0 < kept <= 0.15 * total  # the predicted budget of this model: rho in [0.05, 0.15]


# Held-out needle videos for the query-awareness checks, taken as they come (seed % 4 == 0 is the needle task).
QUERY_SEEDS = tuple(HELD_OUT_SEED_START + 4 * index for index in range(8))


def test_bundled_selector_reads_the_question():
    """On fixed held-out needles, the asked object is kept and top-scored under its own question, and not under the
    counterfactual question (a distractor shape of the same video). A selector that keeps "whatever is colourful"
    (every object is coloured) scores the two questions alike and fails this."""
    model, processor = load_model_and_processor(default_model_path())
    rows = [normalize_row(synthetic_row(seed, task="needle")) for seed in QUERY_SEEDS]
    metrics = evaluate_video_qa(model, processor, rows, max_new_tokens=2).metrics
    assert metrics["evidence/count"] == metrics["evidence_counterfactual/count"] == len(QUERY_SEEDS)
    assert metrics["evidence/token_recall"] - metrics["evidence_counterfactual/token_recall"] >= 0.5
    assert metrics["evidence/top_scored"] >= 0.75 and metrics["evidence_counterfactual/top_scored"] <= 0.125


def _bundled_scores(model, processor, sample, question: str, system: str | None) -> torch.Tensor:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=len(sample.frames), fps=sample.fps, frames_indices=list(
        range(len(sample.frames))))
    batch = processor(text=[text], videos=[sample.frames], video_metadata=[metadata], do_sample_frames=False,
                      return_tensors="pt")
    return model.select(**batch).scores[0]


def test_bundled_scores_follow_the_question_not_the_system_prompt():
    model, processor = load_model_and_processor(default_model_path())
    sample = generate_sample(QUERY_SEEDS[0], "needle", **synthetic_options())
    own = _bundled_scores(model, processor, sample, sample.question, None)
    other_system = _bundled_scores(model, processor, sample, sample.question, "Answer briefly.")
    other_question = _bundled_scores(model, processor, sample, sample.counterfactual_question, None)
    torch.testing.assert_close(own, other_system)  # the processor's question mask leaves the system prompt out
    assert float(torch.corrcoef(torch.stack([own, other_question]))[0, 1]) < 0.9


def test_eval_synthetic_scores_generated_held_out_videos(tmp_path, capsys):
    path = tmp_path / "eval.json"
    assert main(["eval", "--synthetic", "8", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    truths = [generate_sample(seed, **synthetic_options()) for seed in range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + 8)]
    assert [p["answer"] for p in report["predictions"]] == [sample.answer for sample in truths]
    assert [p["type"] for p in report["predictions"]] == [sample.task for sample in truths]
    seeds = range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + 8)
    replies = greedy_replies([synthetic_row(seed) for seed in seeds], 16)  # `qtsplus eval`'s reply length
    assert [p["prediction"] for p in report["predictions"]] == replies
    hits = sum(reply == sample.answer for reply, sample in zip(replies, truths))
    assert report["metrics"]["accuracy"] == pytest.approx(hits / 8)
    assert "accuracy/needle" in capsys.readouterr().out


def test_eval_needs_exactly_one_data_source(capsys):
    assert main(["eval", "--synthetic", "4", "--data", "x.jsonl"]) == 2
    assert "exactly one of --data and --synthetic" in capsys.readouterr().err


def test_uniform_temporal_sampling_keeps_evenly_spaced_patches_with_true_timestamps():
    frames = np.arange(64, dtype=np.uint8)[:, None, None, None].repeat(32, 1).repeat(32, 2).repeat(3, 3)
    kept, fps = uniform_temporal_subsample(frames, 2.0, 5)  # 32 patches, stride 32 // 5 = 6
    assert kept[:, 0, 0, 0].tolist() == [0, 1, 12, 13, 24, 25, 36, 37, 48, 49]
    assert fps == pytest.approx(2.0 / 6)
    # Through the model's processor: 5 patches of 16 tokens, each patch 6 s after the previous one.
    _, processor = load_model_and_processor(default_model_path())
    row = normalize_row(synthetic_row(HELD_OUT_SEED_START))
    [cut] = uniform_rows([row], [77], tokens_per_patch=16)
    batch = VideoQACollator(processor, with_answers=False)([cut])
    assert batch["video_grid_thw"][0, 0].item() == 5
    assert batch["second_per_grid_ts"][0].item() == pytest.approx(6.0)
    with pytest.raises(ValueError, match="num_patches"):
        uniform_temporal_subsample(frames, 2.0, 33)


class FourSyntheticRows(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return synthetic_row(index, seconds=16)


def test_training_reads_a_lazy_dataset(tmp_path):
    result = train(TrainOptions(model=default_model_path(), data="", output=str(tmp_path / "out"), mode="selector",
                                max_steps=2, batch_size=2, learning_rate=1e-3, logging_steps=1),
                   rows=FourSyntheticRows())
    assert result.train_rows == 4 and len([e for e in result.log_history if "loss" in e]) == 2
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")


def test_answer_uses_the_bundled_model_without_model(tmp_path):
    from qtsplus_hf.synthetic import write_mp4

    sample = generate_sample(HELD_OUT_SEED_START, "needle", **synthetic_options())
    video = write_mp4(tmp_path / "needle.mp4", sample.frames, sample.fps)
    result = subprocess.run(
        [sys.executable, "-m", "qtsplus_hf.cli", "answer", "--video", video, "--question", sample.question,
         "--max-new-tokens", "1"], capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 0, result.stderr
    assert "of 512 (rho = " in result.stdout  # the bundled model's 32 s, 32 px videos: 512 vision tokens


def test_bundled_remote_code_is_the_package_code():
    """The checkpoint's remote-code files (it must load without the package) are the package's own: symbolic links
    in the repository, copies in a built wheel. Either way they must read the same."""
    import qtsplus_hf

    package = os.path.dirname(qtsplus_hf.__file__)
    names = [name for name in os.listdir(default_model_path()) if name.endswith(".py")]
    assert len(names) == 6
    for name in names:
        with open(os.path.join(package, name)) as source, open(os.path.join(default_model_path(), name)) as copy:
            assert copy.read() == source.read(), name
