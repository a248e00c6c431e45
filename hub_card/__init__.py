"""The Hub model card of a QTSplus checkpoint: `template.md` rendered from the model itself, offline."""

import os

from huggingface_hub import ModelCard, ModelCardData


TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), "template.md")
# Plus the backbone's stock model type ("qwen2_5_vl", "qwen3_vl").
CARD_TAGS = ["qtsplus", "video", "token-selection", "video-text-to-text"]


def count_parameters(model) -> tuple[int, int]:
    """(parameters of the stock Qwen2.5-VL, parameters of the QTSplus modules), tied weights counted once."""
    base = qtsplus = 0
    for name, parameter in model.named_parameters():  # named_parameters yields a tied tensor once
        if name.startswith("qtsplus."):
            qtsplus += parameter.numel()
        else:
            base += parameter.numel()
    return base, qtsplus


def render_model_card(
    model, base_model: str | None, repo_id: str | None = None, license: str = "apache-2.0"
) -> str:
    """README.md text: YAML front matter (library, pipeline tag, base model when known, license, tags) and the
    Markdown body. `base_model`: the Hub id of the checkpoint this model was built from, or None (unknown)."""
    if base_model is not None and (not isinstance(base_model, str) or not base_model.strip()):
        raise ValueError("base_model must be None or the Hub id of the checkpoint this model was built from")
    base_parameters, qtsplus_parameters = count_parameters(model)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="video-text-to-text",
        base_model=base_model,
        license=license,
        tags=[*CARD_TAGS, type(model).stock_class.config_class.model_type],
    )
    backbone = type(model).backbone_name
    default_name = f"QTSplus {base_model.split('/')[-1]}" if base_model else f"QTSplus {backbone}"
    card = ModelCard.from_template(
        card_data,
        template_path=TEMPLATE_PATH,
        model_name=repo_id.split("/")[-1] if repo_id else default_name,
        repo_id=repo_id or "path/to/this/folder",
        base_model=base_model,
        backbone=backbone,
        config=model.config,
        base_parameters=base_parameters,
        qtsplus_parameters=qtsplus_parameters,
        uses_time_embedding=model.qtsplus.time_embedding is not None,
        dtype=str(model.dtype).removeprefix("torch."),
    )
    return str(card)


__all__ = ["count_parameters", "render_model_card"]
