"""qtsplus-hf: QTSplus query-aware visual token selection for Qwen2.5-VL and Qwen3-VL in Hugging Face transformers."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_qtsplus import QTSplusConfig
from .modeling_qtsplus_qwen2_5_vl import QTSplusQwen2_5_VLForConditionalGeneration
from .modeling_qtsplus_qwen3_vl import (
    QTSplusQwen3VLConfig,
    QTSplusQwen3VLForConditionalGeneration,
    QTSplusQwen3VLProcessor,
)
from .selector_qtsplus import QTSplusCausalLMOutputWithPast, QTSplusInputs, QTSplusSelection
from .hub import PIPELINE_TASK, save_checkpoint
from .pipeline_video_text_to_text import QTSplusVideoTextToTextPipeline
from .processing_qtsplus import QTSplusProcessor
from .video_qtsplus import load_video


__version__ = "0.1.0"

# One (config, model, processor) per backbone.
BACKBONES = {
    "qwen2_5_vl": (QTSplusConfig, QTSplusQwen2_5_VLForConditionalGeneration, QTSplusProcessor),
    "qwen3_vl": (QTSplusQwen3VLConfig, QTSplusQwen3VLForConditionalGeneration, QTSplusQwen3VLProcessor),
}

for _config_class, _model_class, _processor_class in BACKBONES.values():
    # With the package installed, the Auto classes resolve the model type without trust_remote_code ...
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    for _auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        _auto_class.register(_config_class, _model_class, exist_ok=True)
    AutoProcessor.register(_config_class, _processor_class, exist_ok=True)
    # ... and save_pretrained ships the remote-code files, so a checkpoint loads anywhere with trust_remote_code.
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModel")
    _processor_class.register_for_auto_class("AutoProcessor")
PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=QTSplusVideoTextToTextPipeline, pt_model=AutoModel,
                                    type="multimodal")

__all__ = [
    "BACKBONES",
    "QTSplusCausalLMOutputWithPast",
    "QTSplusConfig",
    "QTSplusInputs",
    "QTSplusQwen2_5_VLForConditionalGeneration",
    "QTSplusProcessor",
    "QTSplusQwen3VLConfig",
    "QTSplusQwen3VLForConditionalGeneration",
    "QTSplusQwen3VLProcessor",
    "QTSplusSelection",
    "QTSplusVideoTextToTextPipeline",
    "__version__",
    "load_video",
    "save_checkpoint",
]
