"""Fine-tuning through the Trainer (selector / lora / full), LoRA round trips, data loading and `qtsplus eval`."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_mp4

from qtsplus_hf.cli import main
from qtsplus_hf.data import (
    MULTIPLE_CHOICE_INSTRUCTION, VideoQACollator, load_video_qa, normalize_row, question_text,
)
from qtsplus_hf.evaluation import evaluate_video_qa, normalize_answer, option_letter_token_ids
from qtsplus_hf.tiny import VIDEO_ID
from qtsplus_hf.training import (
    TrainOptions, build_trainer, load_model_and_processor, parameters_without_gradient, prepare_model_for_mode, train,
)


OPTIONS = ["red", "green", "blue", "yellow"]
TYPES = ["needle", "order"]


@pytest.fixture(scope="module")
def qa_folder(tmp_path_factory, tiny_checkpoint):
    """Eight short mp4 files and a multiple-choice JSONL file with relative paths and two question types."""
    folder = tmp_path_factory.mktemp("qa")
    rows = []
    for index in range(8):
        write_mp4(folder / f"clip{index}.mp4", num_frames=8, fps=2, seed=index)
        rows.append({"video": f"clip{index}.mp4", "question": "What colour is the circle?", "options": OPTIONS,
                     "answer": "ABCD"[index % 4], "type": TYPES[index % 2]})
    with open(folder / "train.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return folder


def options_for(qa_folder, tiny_checkpoint, tmp_path, **overrides) -> TrainOptions:
    settings = dict(model=tiny_checkpoint, data=str(qa_folder / "train.jsonl"), video_root=str(qa_folder),
                    output=str(tmp_path / "out"), max_steps=6, batch_size=2, learning_rate=1e-3, logging_steps=2)
    settings.update(overrides)
    return TrainOptions(**settings)


def trained_in_memory(options: TrainOptions, tmp_path):
    """Run the Trainer as `train` does, keeping the model in memory; returns (before, model, processor, rows)."""
    model, processor = load_model_and_processor(options.model)
    rows = load_video_qa(options.data, options.video_root).rows
    torch.manual_seed(options.seed)
    model = prepare_model_for_mode(model, options)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    build_trainer(model, processor, rows, options, output_dir=str(tmp_path / "trainer")).train()
    return before, model, processor, rows


def changed_parameters(before: dict, model) -> set[str]:
    return {name for name, parameter in model.named_parameters() if not torch.equal(before[name], parameter)}


def test_full_training_lowers_the_loss_and_logs_every_term(qa_folder, tiny_checkpoint, tmp_path):
    options = options_for(qa_folder, tiny_checkpoint, tmp_path, mode="full", max_steps=24, batch_size=4)
    result = train(options)
    logs = [entry for entry in result.log_history if "loss" in entry]
    assert len(logs) == 12
    for name in ("lm_loss", "flops_loss", "kv_loss", "smooth_loss", "rho", "kept_tokens"):
        assert all(name in entry for entry in logs), name
    first, last = sum(e["loss"] for e in logs[:2]) / 2, sum(e["loss"] for e in logs[-2:]) / 2
    assert last < first - 1.0, (first, last)  # from ~ln(vocabulary size)
    assert all(0.05 <= entry["rho"] <= 0.5 for entry in logs)  # the paper's ρ range
    assert os.path.isfile(os.path.join(options.output, "model.safetensors"))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".qtsplus-")]  # staging removed


def test_training_at_a_fixed_keep_ratio_keeps_that_share(qa_folder, tiny_checkpoint, tmp_path):
    _, processor = load_model_and_processor(tiny_checkpoint)
    rows = load_video_qa(str(qa_folder / "train.jsonl"), str(qa_folder)).rows
    tokens_per_video = int((VideoQACollator(processor)(rows[:1])["input_ids"] == VIDEO_ID).sum())
    options = options_for(qa_folder, tiny_checkpoint, tmp_path, mode="selector", keep_ratio=0.5, max_steps=2,
                          logging_steps=1)
    logs = [entry for entry in train(options).log_history if "loss" in entry]
    assert [entry["kept_tokens"] for entry in logs] == [math.ceil(0.5 * tokens_per_video)] * 2


def test_frozen_parameters_are_exactly_those_without_gradient(tiny_checkpoint, qa_folder):
    model, processor = load_model_and_processor(tiny_checkpoint)
    with torch.no_grad():  # a trained re-encoder: its zero-initialised residual outputs would block gradients
        for parameter in model.qtsplus.parameters():
            if not parameter.any():
                parameter.normal_(std=0.02)
    model.train()
    rows = load_video_qa(str(qa_folder / "train.jsonl"), str(qa_folder)).rows[:2]
    outputs = model(**VideoQACollator(processor)(rows))
    outputs.loss.backward()
    selector_without_gradient = {
        name for name, parameter in model.named_parameters() if name.startswith("qtsplus.") and parameter.grad is None
    }
    assert all(p.grad.any() for n, p in model.qtsplus.named_parameters() if f"qtsplus.{n}" not in selector_without_gradient)
    assert selector_without_gradient == set(parameters_without_gradient(model))
    assert selector_without_gradient  # the last scoring layer's value/output projections and feed-forward


def test_selector_mode_changes_only_the_selector(qa_folder, tiny_checkpoint, tmp_path):
    options = options_for(qa_folder, tiny_checkpoint, tmp_path, mode="selector")
    before, model, _, _ = trained_in_memory(options, tmp_path)
    changed = changed_parameters(before, model)
    assert changed and all(name.startswith("qtsplus.") for name in changed)
    for part in ("scoring_layers.0.q_proj", "budget.mlp.0", "reencode_layers.0.core.o_proj", "time_embedding"):
        assert any(part in name for name in changed), part


def test_lora_mode_changes_only_lora_and_selector_and_round_trips(qa_folder, tiny_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    options = options_for(qa_folder, tiny_checkpoint, tmp_path, mode="lora", lora_r=4, lora_alpha=8)
    before, model, processor, rows = trained_in_memory(options, tmp_path)
    changed = changed_parameters(before, model)
    assert all("lora_" in name or ".qtsplus.modules_to_save." in name for name in changed)
    assert any("language_model" in name and "lora_B" in name for name in changed)
    assert any(".qtsplus.modules_to_save.default.budget." in name for name in changed)
    assert not any("scoring_layers" in name and "lora_" in name for name in model.state_dict())

    batch = VideoQACollator(processor)(rows[:2])
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_checkpoint, trust_remote_code=True), adapter)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, expected, rtol=0, atol=0)

    # The merged checkpoint loads with trust_remote_code in a fresh process where peft cannot be imported.
    from qtsplus_hf import save_checkpoint

    merged = tmp_path / "merged"
    save_checkpoint(model.merge_and_unload(), processor, merged)
    torch.save(dict(batch), tmp_path / "batch.pt")
    script = (
        "import sys, torch\n"
        "sys.modules['peft'] = None\n"  # `import peft` now raises ImportError
        "from transformers import AutoModel\n"
        f"model = AutoModel.from_pretrained({str(merged)!r}, trust_remote_code=True).eval()\n"
        "assert 'qtsplus_hf' not in sys.modules\n"
        f"batch = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(**batch).logits, {str(tmp_path / 'merged_logits.pt')!r})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "merged_logits.pt"), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture
def lm_attention_calls(monkeypatch):
    """Every training-mode call of the first LM decoder layer's attention in the model handed to the Trainer (the
    dtype of its output), and that model. The attention runs inside the checkpointed layer: once per forward pass,
    and once more in the backward pass when checkpointing recomputes the layer (transformers keeps the layer's own
    hooks outside; the MLP, last in the layer, is where early-stopping recomputation ends without returning)."""
    from types import SimpleNamespace

    import qtsplus_hf.training as training

    seen = SimpleNamespace(dtypes=[], models=[])
    build = training.build_trainer

    def build_and_watch(model, *args, **kwargs):
        attention = next(module for name, module in model.named_modules()
                         if name.endswith("language_model.layers.0.self_attn"))
        attention.register_forward_hook(
            lambda module, _, output: seen.dtypes.append(output[0].dtype) if module.training else None)
        seen.models.append(model)
        return build(model, *args, **kwargs)

    monkeypatch.setattr(training, "build_trainer", build_and_watch)
    return seen


def test_cli_train_lora_with_merge_and_gradient_checkpointing(qa_folder, tiny_checkpoint, tmp_path, capsys,
                                                              lm_attention_calls):
    from peft import PeftModel
    from transformers import AutoModel

    output = tmp_path / "run"
    code = main(["train", "--model", tiny_checkpoint, "--data", str(qa_folder / "train.jsonl"), "--video-root",
                 str(qa_folder), "--output", str(output), "--mode", "lora", "--max-steps", "2", "--batch-size", "2",
                 "--gradient-checkpointing", "--merge", "--lora-r", "4"])
    assert code == 0
    calls = len(lm_attention_calls.dtypes)
    assert calls == 2 * 2  # 2 steps: forward + recomputation in backward (1 per step without)
    assert "trained on 8 rows (0 skipped), mode lora" in capsys.readouterr().out
    assert os.path.isfile(output / "adapter" / "adapter_model.safetensors")
    merged = AutoModel.from_pretrained(output, trust_remote_code=True)
    with_adapter = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_checkpoint, trust_remote_code=True),
                                             output / "adapter").merge_and_unload()
    for name, tensor in with_adapter.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


# Runs `qtsplus train` (argv[2:]) under torchrun, recording per rank into argv[1]: every file it opens for writing
# and every rename under the output's parent folder (Python's audit hooks), the videos of each training batch, and
# the trained parameters.
TORCHRUN_DRIVER = """
import json, os, sys
import torch
import qtsplus_hf.training as training
from qtsplus_hf.cli import main

record, rank, parent = sys.argv[1], os.environ["RANK"], os.path.dirname(os.path.abspath(sys.argv[1]))
writes, batches = [], []

def audit(event, args):
    if event == "open" and isinstance(args[0], str) and not args[0].startswith(record):
        mode, flags = args[1], args[2]
        writing = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and os.path.abspath(args[0]).startswith(parent):
            writes.append(["write", os.path.abspath(args[0])])
    elif event == "os.rename" and os.path.abspath(str(args[1])).startswith(parent):
        writes.append(["rename", os.path.abspath(str(args[0])), os.path.abspath(str(args[1]))])

sys.addaudithook(audit)
compute_loss, trainer_train = training.QTSplusTrainer.compute_loss, training.QTSplusTrainer.train

def recorded_loss(self, model, inputs, *args, **kwargs):
    if model.training:
        batches.append(float(inputs["pixel_values_videos"].double().sum()))
    return compute_loss(self, model, inputs, *args, **kwargs)

def recorded_train(self, *args, **kwargs):
    outcome = trainer_train(self, *args, **kwargs)
    model = self.accelerator.unwrap_model(self.model)
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, os.path.join(record, rank + ".pt"))
    return outcome

training.QTSplusTrainer.compute_loss, training.QTSplusTrainer.train = recorded_loss, recorded_train
code = main(sys.argv[2:])
with open(os.path.join(record, rank + ".json"), "w") as handle:
    json.dump({"writes": writes, "batches": batches}, handle)
sys.exit(code)
"""


def test_torchrun_two_processes_write_one_complete_checkpoint(qa_folder, tiny_checkpoint, tmp_path):
    """DDP on the CPU (gloo): nothing extra from the project, no unused-parameter error with activation
    checkpointing and a fixed keep ratio; the two processes train on different rows into equal replicas, and only the
    main process writes the output."""
    from safetensors.torch import load_file

    output, record = tmp_path / "ddp", tmp_path / "record"
    record.mkdir()
    (tmp_path / "driver.py").write_text(TORCHRUN_DRIVER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        str(tmp_path / "driver.py"), str(record), "train", "--model", tiny_checkpoint, "--data",
        str(qa_folder / "train.jsonl"), "--video-root", str(qa_folder), "--output", str(output), "--mode", "selector",
        "--max-steps", "2", "--gradient-checkpointing", "--keep-ratio", "0.5",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.count("trained on 8 rows") == 2  # both processes trained
    assert {"config.json", "model.safetensors", "processor_config.json"} <= set(os.listdir(output))
    assert [name for name in os.listdir(tmp_path) if name.startswith(".qtsplus-")] == []
    ranks = [json.loads((record / f"{rank}.json").read_text()) for rank in "01"]
    # Rank 1 opens nothing for writing and renames nothing; rank 0 writes into one folder and renames it into place.
    assert ranks[1]["writes"] == []
    [(_, staging, renamed)] = [event for event in ranks[0]["writes"] if event[0] == "rename"]
    written = {os.path.dirname(event[1]) for event in ranks[0]["writes"] if event[0] == "write"}
    assert renamed == str(output) and written == {staging}
    # Each process trained on its own rows (2 steps of one row), yet the replicas end equal: gradients were averaged.
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 2
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"])
    replicas = [torch.load(record / f"{rank}.pt") for rank in "01"]
    initial = load_file(os.path.join(tiny_checkpoint, "model.safetensors"))
    saved = load_file(output / "model.safetensors")
    assert any(not torch.equal(tensor, initial[name]) for name, tensor in replicas[0].items())
    for name, tensor in replicas[0].items():
        assert torch.equal(tensor, replicas[1][name]) and torch.equal(tensor, saved[name]), name


def test_bf16_training_runs_on_this_device(qa_folder, tiny_checkpoint, tmp_path, lm_attention_calls):
    result = train(options_for(qa_folder, tiny_checkpoint, tmp_path, mode="lora", bf16=True, max_steps=2))
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert lm_attention_calls.dtypes == [torch.bfloat16] * 2  # autocast inside the LM, one forward per step
    [model] = lm_attention_calls.models  # the float32 checkpoint stays float32: its trained weights are the master
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


def test_a_bf16_checkpoint_trains_its_selector_in_float32(qa_folder, tiny_checkpoint, tmp_path):
    from safetensors import safe_open

    from qtsplus_hf import save_checkpoint

    model, processor = load_model_and_processor(tiny_checkpoint)
    save_checkpoint(model.to(torch.bfloat16), processor, tmp_path / "bf16")
    options = options_for(qa_folder, str(tmp_path / "bf16"), tmp_path, mode="selector", max_steps=2)
    train(options)
    with safe_open(os.path.join(options.output, "model.safetensors"), "pt") as weights:
        dtypes = {name: weights.get_slice(name).get_dtype() for name in weights.keys()}
    budget = "qtsplus.budget.mlp.0.weight"
    assert dtypes[budget] == "F32" and dtypes["lm_head.weight"] == "BF16"


def test_eval_accuracy_matches_a_hand_count(qa_folder, tiny_checkpoint, tmp_path):
    model, processor = load_model_and_processor(tiny_checkpoint)
    rows = load_video_qa(str(qa_folder / "train.jsonl"), str(qa_folder)).rows
    result = evaluate_video_qa(model, processor, rows, keep_ratio=0.5)

    letter_ids = option_letter_token_ids(processor.tokenizer, len(OPTIONS))
    collator = VideoQACollator(processor, with_answers=False)
    hand = {"all": [], **{kind: [] for kind in TYPES}}
    for row in rows:
        with torch.no_grad():
            logits = model.eval()(**collator([row]), qtsplus_keep_ratio=0.5).logits[0, -1]
        correct = "ABCD"[int(logits[letter_ids].argmax())] == row["answer"]
        hand["all"].append(correct)
        hand[row["type"]].append(correct)
    assert result.metrics["accuracy"] == sum(hand["all"]) / len(rows)
    for kind in TYPES:
        assert result.metrics[f"accuracy/{kind}"] == sum(hand[kind]) / len(hand[kind])
        assert result.metrics[f"count/{kind}"] == 4
    assert 0.4 < result.metrics["mean_kept_ratio"] <= 0.6  # ceil(0.5 · M) of M tokens per video


def greedy_reply_without_cache(model, batch: dict, max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding by hand: the whole prompt (video included) through `forward` again for every new token."""
    batch, reply = dict(batch), []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(**batch, qtsplus_keep_ratio=0.5).logits
        token = int(logits[0, -1].argmax())
        if token == eos_id:
            break
        reply.append(token)
        # the new token is text: attended, not part of the question, not a video token
        for name, value in (("input_ids", token), ("attention_mask", 1), ("qtsplus_query_mask", False),
                            ("mm_token_type_ids", 0)):
            batch[name] = torch.cat([batch[name], torch.tensor([[value]], dtype=batch[name].dtype)], dim=1)
    return reply


def test_free_form_eval_matches_greedy_decoding_by_hand(qa_folder, tiny_checkpoint):
    model, processor = load_model_and_processor(tiny_checkpoint)
    model.eval()
    rows = [{**row, "options": None, "answer_letter": None, "answer": "red"}
            for row in load_video_qa(str(qa_folder / "train.jsonl"), str(qa_folder)).rows[:4]]
    collator = VideoQACollator(processor, with_answers=False)
    replies = [processor.tokenizer.decode(greedy_reply_without_cache(model, collator([row]), 3,
                                                                     processor.tokenizer.eos_token_id))
               for row in rows]
    assert all(normalize_answer(reply) for reply in replies)  # non-empty replies, so the comparison means something
    rows[0]["answer"] = f" {replies[0].upper()}. "  # case, white space and a final full stop do not count
    result = evaluate_video_qa(model, processor, rows, keep_ratio=0.5, max_new_tokens=3)
    assert [p["prediction"] for p in result.predictions] == [normalize_answer(reply) for reply in replies]
    assert result.metrics["accuracy"] == sum(normalize_answer(r) == "red" for r in replies[1:]) / 4 + 1 / 4


def test_cli_eval_writes_a_table_and_json(qa_folder, tiny_checkpoint, tmp_path, capsys):
    model, processor = load_model_and_processor(tiny_checkpoint)
    # Answers A, B, C, D: a random model that favours one letter still gets one right.
    rows = load_video_qa(str(qa_folder / "train.jsonl"), str(qa_folder)).rows[:4]
    letter_ids = option_letter_token_ids(processor.tokenizer, len(OPTIONS))
    with torch.no_grad():  # by hand: the letter logits at the first answer position, at the predicted budget
        letters = ["ABCD"[int(model.eval()(**VideoQACollator(processor, with_answers=False)([row])).logits[
            0, -1, letter_ids].argmax())] for row in rows]
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", tiny_checkpoint, "--data", str(qa_folder / "train.jsonl"), "--video-root",
                 str(qa_folder), "--limit", "4", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["metrics"]["count"] == 4 and len(report["predictions"]) == 4
    assert "accuracy" in printed and "mean_latency_s" in printed
    assert [p["prediction"] for p in report["predictions"]] == letters
    assert [p["answer"] for p in report["predictions"]] == [row["answer"] for row in rows]
    assert report["metrics"]["accuracy"] == sum(a == row["answer"] for a, row in zip(letters, rows)) / 4


def test_cli_eval_progress_bar_goes_to_stderr_and_no_progress_removes_it(qa_folder, tiny_checkpoint, tmp_path,
                                                                         capsys):
    from transformers.utils import logging as transformers_logging

    out = tmp_path / "eval.json"
    argv = ["eval", "--model", tiny_checkpoint, "--data", str(qa_folder / "train.jsonl"), "--video-root",
            str(qa_folder), "--limit", "2", "--json", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "eval: 100%" in captured.err and "2/2" in captured.err  # transformers' tqdm, one step per question
    assert "%|" not in captured.out and "\r" not in captured.out  # stdout: the table only
    assert captured.out.splitlines()[0].split() == ["metric", "value"]
    assert json.loads(out.read_text())["metrics"]["count"] == 2
    fresh = tmp_path / "fresh.jsonl"  # a file datasets has not cached: reading it would show datasets' own bar
    fresh.write_text((qa_folder / "train.jsonl").read_text())
    argv[argv.index("--data") + 1] = str(fresh)
    assert main(argv + ["--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "accuracy" in captured.out  # no bar: ours, weight loading's, datasets'
    assert transformers_logging.is_progress_bar_enabled()  # main() leaves the switch as it found it


def test_trainer_progress_bar_follows_the_transformers_switch(qa_folder, tiny_checkpoint, tmp_path):
    from transformers.utils import logging as transformers_logging

    from qtsplus_hf.training import training_arguments

    options = options_for(qa_folder, tiny_checkpoint, tmp_path)
    assert not training_arguments(options, str(tmp_path / "on")).disable_tqdm
    transformers_logging.disable_progress_bar()  # what `qtsplus train --no-progress` does
    try:
        assert training_arguments(options, str(tmp_path / "off")).disable_tqdm is True
    finally:
        transformers_logging.enable_progress_bar()


def test_bad_rows_are_reported_and_skipped(qa_folder, tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 100)
    good = {"video": "clip0.mp4", "question": "What colour is the circle?", "options": OPTIONS, "answer": "A"}
    rows = [
        good,
        {**good, "question": ""},                              # no question
        {**good, "answer": "purple"},                          # the answer is not among the options
        {**good, "video": str(tmp_path / "broken.mp4")},       # unreadable video
        {**good, "video": "missing.mp4"},                      # no such file
        {**good, "answer": "B"},
    ]
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = load_video_qa(str(data_file), str(qa_folder))
    assert len(data.rows) == 2 and [s.index for s in data.skipped] == [1, 2, 3, 4]
    reasons = [s.reason for s in data.skipped]
    assert reasons[0] == "no question" and "not one of the options" in reasons[1]
    assert reasons[2].startswith("unreadable video") and reasons[3] == "video file not found"
    assert data.skipped_summary().startswith("skipped 4 of 6 rows: row 1")

    code = main(["train", "--model", tiny_checkpoint, "--data", str(data_file), "--video-root", str(qa_folder),
                 "--output", str(tmp_path / "out"), "--mode", "selector", "--max-steps", "1"])
    captured = capsys.readouterr()
    assert code == 0
    assert "trained on 2 rows (4 skipped)" in captured.out
    assert "skipped 4 of 6 rows" in captured.err


def test_data_without_usable_rows_fails_in_one_line(tmp_path, tiny_checkpoint, capsys):
    data_file = tmp_path / "data.jsonl"
    data_file.write_text(json.dumps({"video": "nowhere.mp4", "question": "q?", "answer": "a"}) + "\n")
    output = tmp_path / "out"
    code = main(["train", "--model", tiny_checkpoint, "--data", str(data_file), "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2
    assert "no usable rows" in err and "Traceback" not in err
    assert not output.exists()
    assert main(["eval", "--model", tiny_checkpoint, "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert main(["eval", "--model", tiny_checkpoint, "--data", str(data_file), "--device", "warp-drive"]) == 2
    assert capsys.readouterr().err.startswith("qtsplus eval: error: --device")


def test_qtsplus_dataset_style_rows_and_other_layouts_normalise(tmp_path):
    options = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}
    styles = [
        {"vision_id": "v.mp4", "question": "Colour?", "options": options, "answer": "C", "question_type": "needle"},
        {"video": "v.mp4", "question": "Colour?", "A": "red", "B": "green", "C": "blue", "D": "yellow", "answer": "C"},
        {"video": "v.mp4", "question": "Colour?", "options": ["A. red", "B. green", "C. blue", "D. yellow"],
         "answer": "(C)"},
        {"video": "v.mp4", "question": "Colour?", "options": json.dumps(list(options.values())), "answer": 2},
        {"video": "v.mp4", "question": "Colour?", "options": list(options.values()), "answer": "Blue"},
    ]
    for row in styles:
        normalised = normalize_row(row, video_root="/videos")
        assert normalised["options"] == ["red", "green", "blue", "yellow"], row
        assert normalised["answer"] == normalised["answer_letter"] == "C", row
        assert normalised["video"] == "/videos/v.mp4"
    assert normalize_row(styles[0])["type"] == "needle"
    assert question_text(normalize_row(styles[0])).splitlines()[1:3] == ["A. red", "B. green"]
    free_form = normalize_row({"video": "v.mp4", "question": "What happens?", "answer": "a circle moves"})
    assert free_form["options"] is None and free_form["answer"] == "a circle moves"


def test_csv_and_saved_datasets_load_the_same_rows(qa_folder, tmp_path):
    import datasets

    jsonl = load_video_qa(str(qa_folder / "train.jsonl"), str(qa_folder)).rows
    raw = datasets.load_dataset("json", data_files=str(qa_folder / "train.jsonl"), split="train")
    raw.save_to_disk(str(tmp_path / "saved"))
    saved = load_video_qa(str(tmp_path / "saved"), str(qa_folder)).rows
    raw.map(lambda row: {"options": json.dumps(row["options"])}).to_csv(str(tmp_path / "train.csv"))
    csv = load_video_qa(str(tmp_path / "train.csv"), str(qa_folder)).rows
    assert saved == jsonl and csv == jsonl


def test_labels_cover_only_the_answer_and_the_query_mask_only_the_question(qa_folder, tiny_checkpoint):
    _, processor = load_model_and_processor(tiny_checkpoint)
    rows = load_video_qa(str(qa_folder / "train.jsonl"), str(qa_folder)).rows[:2]
    batch = VideoQACollator(processor)(rows)
    tokenizer = processor.tokenizer
    for index, row in enumerate(rows):
        ids = batch["input_ids"][index]
        assert tokenizer.decode(ids[batch["labels"][index] != -100]) == row["answer"] + "<|im_end|>"
        question_and_options = question_text(row).removesuffix(MULTIPLE_CHOICE_INSTRUCTION)
        assert tokenizer.decode(ids[batch["qtsplus_query_mask"][index]]) == question_and_options
    assert batch["attention_mask"][:, 0].all()  # right padding for training


@pytest.fixture(scope="module")
def evidence_folder(tmp_path_factory):
    """Four mp4s and free-form rows with evidence columns (seconds, a box, CSV-style JSON text for one)."""
    folder = tmp_path_factory.mktemp("evidence")
    rows = []
    for index in range(4):
        write_mp4(folder / f"clip{index}.mp4", num_frames=8, fps=2, seed=index)
        rows.append({"video": f"clip{index}.mp4", "question": "What colour is the circle?", "answer": "red",
                     "evidence_seconds": [index % 4], "evidence_boxes": [[index % 4, 0.0, 0.0, 0.5, 0.5]],
                     "counterfactual_question": "What colour is the square?"})
    rows[3]["evidence_seconds"] = json.dumps(rows[3]["evidence_seconds"])
    with open(folder / "train.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return folder


def test_collator_marks_the_evidence_tokens_of_each_row(evidence_folder, tiny_checkpoint):
    _, processor = load_model_and_processor(tiny_checkpoint)
    rows = load_video_qa(str(evidence_folder / "train.jsonl"), str(evidence_folder)).rows
    batch = VideoQACollator(processor)(rows[:2])
    mask = batch["qtsplus_evidence_mask"]
    assert mask.shape == batch["input_ids"].shape and not bool((mask & (batch["input_ids"] != VIDEO_ID)).any())
    for row, (grid_t, grid_h, grid_w) in enumerate(batch["video_grid_thw"].tolist()):
        per_patch = (grid_h // 2) * (grid_w // 2)
        interval = float(batch["second_per_grid_ts"][row])
        marked = mask[row][batch["input_ids"][row] == VIDEO_ID].view(grid_t, per_patch)
        patch = int(rows[row]["evidence_seconds"][0] // interval)
        assert marked.sum(-1).nonzero().flatten().tolist() == [patch]  # only the evidence second's patch
        rows_, cols = grid_h // 2, grid_w // 2  # the box covers the top-left quarter of the frame
        expected = torch.zeros(rows_, cols, dtype=torch.bool)
        expected[: -(-rows_ // 2), : -(-cols // 2)] = True
        assert torch.equal(marked[patch].view(rows_, cols), expected)
    assert "qtsplus_evidence_mask" not in VideoQACollator(processor, with_answers=False)(rows[:2])


def test_cli_train_lora_with_every_selector_signal(evidence_folder, tiny_checkpoint, tmp_path):
    """Grounding, distillation and the exploring gate through `qtsplus train` in LoRA mode: each term is logged,
    the selector (saved in full through modules_to_save) changes, and a second run without the signals differs."""
    def run(output, *signals):
        out = tmp_path / output
        argv = ["train", "--model", tiny_checkpoint, "--data", str(evidence_folder / "train.jsonl"), "--video-root",
                str(evidence_folder), "--mode", "lora", "--output", str(out), "--max-steps", "4", "--batch-size", "2",
                "--learning-rate", "1e-2", "--logging-steps", "1", "--keep-ratio", "0.5", *signals]
        assert main(argv) == 0
        return out

    with_signals = run("with", "--grounding-weight", "1", "--distill-weight", "1", "--explore-ratio", "0.3")
    from safetensors.torch import load_file

    def selector(folder):
        weights = load_file(str(folder / "adapter_model.safetensors"))
        return {name: tensor for name, tensor in weights.items() if "qtsplus" in name and "scoring_layers" in name}

    trained = selector(with_signals)
    assert trained
    without = selector(run("without"))
    assert any(not torch.equal(trained[name], without[name]) for name in trained)
    config = json.loads((with_signals / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["qtsplus"]


def test_trainer_logs_the_selector_signals(evidence_folder, tiny_checkpoint, tmp_path):
    options = TrainOptions(model=tiny_checkpoint, data=str(evidence_folder / "train.jsonl"),
                           video_root=str(evidence_folder), output=str(tmp_path / "out"), mode="full", max_steps=4,
                           batch_size=2, learning_rate=1e-3, logging_steps=2, keep_ratio=0.5, grounding_weight=0.5,
                           distill_weight=0.25, explore_ratio=0.2)
    result = train(options)
    logs = [entry for entry in result.log_history if "loss" in entry]
    assert logs and all("grounding_loss" in entry and "distill_loss" in entry for entry in logs)
    assert all(entry["grounding_loss"] > 0 for entry in logs)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["qtsplus_lambda_grounding"], saved["qtsplus_lambda_distill"], saved["qtsplus_explore_ratio"]) == (
        0.5, 0.25, 0.2)
    with pytest.raises(ValueError, match="explore_ratio"):
        TrainOptions(model="m", data="d", output="o", explore_ratio=1.0)


def test_bad_evidence_columns_skip_the_row_with_a_reason(tmp_path):
    write_mp4(tmp_path / "a.mp4", num_frames=4, fps=2)
    rows = [{"video": "a.mp4", "question": "q?", "answer": "x", "evidence_seconds": "not json"},
            {"video": "a.mp4", "question": "q?", "answer": "x", "evidence_boxes": [[0, 0.1]]},
            {"video": "a.mp4", "question": "q?", "answer": "x", "evidence_seconds": [1]}]
    data = load_video_qa(rows, str(tmp_path))
    assert len(data.rows) == 1 and [s.reason for s in data.skipped] == [
        "evidence_seconds is not a list (nor JSON text of one): 'not json'",
        "each evidence box must be [second, x0, y0, x1, y1], got [0, 0.1]"]


def test_question_first_puts_the_question_before_the_video(evidence_folder, tiny_checkpoint):
    _, processor = load_model_and_processor(tiny_checkpoint)
    rows = load_video_qa(str(evidence_folder / "train.jsonl"), str(evidence_folder)).rows[:1]
    after = VideoQACollator(processor, with_answers=False)(rows)
    before = VideoQACollator(processor, with_answers=False, question_first=True)(rows)
    for batch, question_first in ((after, False), (before, True)):
        ids = batch["input_ids"][0]
        first_video = int((ids == VIDEO_ID).nonzero()[0])
        question = batch["qtsplus_query_mask"][0].nonzero().flatten()
        assert bool((question < first_video).all()) == question_first
        assert processor.tokenizer.decode(ids[question]).strip() == rows[0]["question"]
