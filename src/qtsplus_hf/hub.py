"""Writing a QTSplus checkpoint folder that loads anywhere with trust_remote_code."""

import os

from transformers.dynamic_module_utils import custom_object_save

from .pipeline_video_text_to_text import QTSplusVideoTextToTextPipeline

PIPELINE_TASK = "video-text-to-text"


def save_checkpoint(model, processor, directory: str | os.PathLike) -> None:
    """Save model, processor and the pipeline code into `directory`.

    The folder then serves `AutoModel` / `AutoModelForCausalLM` / `AutoModelForImageTextToText`, `AutoProcessor`
    and `pipeline("video-text-to-text")`, each with `trust_remote_code=True`, without `qtsplus_hf` installed.
    """
    os.makedirs(directory, exist_ok=True)
    pipeline_class = QTSplusVideoTextToTextPipeline
    # What transformers' Pipeline.save_pretrained records for a registered custom pipeline; that method saves the
    # tokenizer and image processor but not a multimodal processor, hence this helper.
    model.config.custom_pipelines = {
        PIPELINE_TASK: {
            "impl": f"{pipeline_class.__module__.split('.')[-1]}.{pipeline_class.__name__}",
            "pt": ("AutoModel",),
            "type": "multimodal",
        }
    }
    custom_object_save(pipeline_class, directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
