"""`device_map`: each selector layer stays on one device, and accelerate's CPU / disk offload (the hooks a multi-device
map runs) gives the same logits, loss, selection and tokens as the model in one piece.

On a CPU-only machine every execution device is the CPU, so these tests cannot show tensors from two devices
meeting; that is the GPU check's (docs/design-notes.md, "Devices").
"""

import warnings

import pytest
import torch
from accelerate import infer_auto_device_map
from accelerate.utils import compute_module_sizes

from qtsplus_hf import QTSplusQwen2_5_VLForConditionalGeneration
from qtsplus_hf.tiny import tiny_qtsplus_config, video_prompt_batch


SELECTOR_LAYERS = ("qtsplus.scoring_layers.0", "qtsplus.scoring_layers.1",
                   "qtsplus.reencode_layers.0", "qtsplus.reencode_layers.1")
# Every selector part on its own entry, neighbours alternating between the CPU and the disk, and the LM split too.
SPLIT_MAP = {
    "model.visual": "cpu",
    "model.language_model.embed_tokens": "disk",
    "model.language_model.layers.0": "cpu",
    "model.language_model.layers.1": "disk",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "disk",
    "qtsplus.scoring_layers.0": "disk",
    "qtsplus.scoring_layers.1": "cpu",
    "qtsplus.budget": "disk",
    "qtsplus.query_token_weights": "cpu",
    "qtsplus.reencode_layers.0": "cpu",
    "qtsplus.reencode_layers.1": "disk",
    "qtsplus.time_embedding": "disk",
    "qtsplus.relevance_embedding": "cpu",
}
# The selector whole (its own forward hooked), as `infer_auto_device_map` places it when it fits.
WHOLE_MAP = {"model.visual": "disk", "model.language_model": "cpu", "lm_head": "cpu", "qtsplus": "disk"}


def every_part_config():
    """Two scoring and two re-encode layers, weighted aggregation, relevance and time embeddings: every module."""
    return tiny_qtsplus_config(qtsplus_num_scoring_layers=2, qtsplus_num_reencode_layers=2,
                               qtsplus_score_aggregation="weighted", qtsplus_relevance_embedding=True)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    model = QTSplusQwen2_5_VLForConditionalGeneration(every_part_config()).eval()
    folder = tmp_path_factory.mktemp("device_map_model")
    model.save_pretrained(folder)
    return model, folder


def test_auto_device_map_keeps_each_selector_layer_on_one_device(saved_model):
    model, _ = saved_model
    assert {"QTSplusAttentionLayer", "QTSplusReencodeLayer"} <= set(model._no_split_modules)
    assert {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"} <= set(model._no_split_modules)  # the stock ones kept
    layer_size = compute_module_sizes(model)["qtsplus.scoring_layers.0"]
    selector_split = False
    for fraction in (0.7, 1.2, 1.6, 2.3, 3.1):  # device capacities around one selector layer: boundaries fall inside
        capacity = int(fraction * layer_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GPUs 0-2 exist only in the plan: infer_auto_device_map warns, then plans
            device_map = infer_auto_device_map(
                model, max_memory={0: capacity, 1: capacity, 2: capacity, "cpu": capacity, "disk": 10**12},
                no_split_module_classes=list(model._no_split_modules),
            )
        selector_split |= any(key.startswith("qtsplus.") for key in device_map)
        for layer in SELECTOR_LAYERS:
            # No entry inside a layer: one device, and the hook on the layer itself (whose forward the selector
            # calls), not on a part such as a re-encode layer's `core`.
            inside = [key for key in device_map if key.startswith(layer + ".")]
            assert not inside, f"{layer} split into {inside} at capacity {capacity}: {device_map}"
    assert selector_split  # some capacity did place the selector's layers apart


def test_every_selector_layer_runs_as_a_module(saved_model):
    """A `device_map` hook moves a layer's inputs only when the layer is called (its `forward`), not when one of its
    methods is: so every selector layer must be called, with the masks it uses among its arguments."""
    model, _ = saved_model
    calls = {}

    def record(name):
        def hook(module, args):
            calls.setdefault(name, []).append([arg.dtype for arg in args if isinstance(arg, torch.Tensor)])
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in SELECTOR_LAYERS]
    try:
        with torch.no_grad():
            # Videos of two lengths: the selector pads, so its layers take key masks (one unpadded video needs none).
            model(**video_prompt_batch([[(4, 4, 4), (2, 4, 4)]], [4], every_part_config()))
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(calls) == sorted(SELECTOR_LAYERS)
    assert all(len(dtypes) == 1 and torch.bool in dtypes[0] for dtypes in calls.values()), calls


@pytest.mark.parametrize("device_map", [SPLIT_MAP, WHOLE_MAP], ids=["split", "whole"])
def test_cpu_and_disk_offload_equal_the_model_in_one_piece(saved_model, tmp_path, device_map):
    model, folder = saved_model
    offloaded = QTSplusQwen2_5_VLForConditionalGeneration.from_pretrained(
        folder, device_map=device_map, offload_folder=tmp_path, attn_implementation="eager"
    ).eval()
    assert any(parameter.device.type == "meta" for parameter in offloaded.qtsplus.parameters())  # really on disk
    # Sample 0 holds two videos (so the selector pads), sample 1 one; left padding; labels on the last two tokens.
    batch = video_prompt_batch([[(4, 4, 4), (2, 4, 4)], [(2, 4, 6)]], [4, 6], every_part_config(), seed=3)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -2:] = batch["input_ids"][:, -2:]
    with torch.no_grad():
        expected, actual = model(**batch, labels=labels), offloaded(**batch, labels=labels)
    # Exactly equal: the same CPU kernels run on the same weights; offloading only moves them in and out.
    assert torch.equal(actual.logits, expected.logits)
    for name in ("loss", "lm_loss", "flops_loss", "kv_loss", "smooth_loss"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name
    assert torch.equal(actual.qtsplus.rho, expected.qtsplus.rho)
    assert all(map(torch.equal, actual.qtsplus.kept_indices, expected.qtsplus.kept_indices))
    assert all(map(torch.equal, actual.qtsplus.scores, expected.qtsplus.scores))
    settings = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(offloaded.generate(**batch, **settings), model.generate(**batch, **settings))
