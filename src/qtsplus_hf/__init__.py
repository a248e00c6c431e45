"""qtsplus-hf: QTSplus query-aware visual token selection for Qwen2.5-VL in Hugging Face transformers."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_qtsplus import QTSplusConfig
from .modeling_qtsplus_qwen2_5_vl import (
    QTSplusCausalLMOutputWithPast,
    QTSplusInputs,
    QTSplusQwen2_5_VLForConditionalGeneration,
    QTSplusSelection,
)
from .hub import PIPELINE_TASK, save_checkpoint
from .pipeline_video_text_to_text import QTSplusVideoTextToTextPipeline
from .processing_qtsplus import QTSplusProcessor
from .video_qtsplus import load_video


__version__ = "0.1.0"

# With the package installed, the Auto classes resolve the model type without trust_remote_code ...
AutoConfig.register(QTSplusConfig.model_type, QTSplusConfig, exist_ok=True)
for _auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto_class.register(QTSplusConfig, QTSplusQwen2_5_VLForConditionalGeneration, exist_ok=True)
AutoProcessor.register(QTSplusConfig, QTSplusProcessor, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=QTSplusVideoTextToTextPipeline, pt_model=AutoModel,
                                    type="multimodal")
# ... and save_pretrained ships the remote-code files, so a checkpoint loads anywhere with trust_remote_code.
QTSplusConfig.register_for_auto_class()
QTSplusQwen2_5_VLForConditionalGeneration.register_for_auto_class("AutoModel")
QTSplusProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "QTSplusCausalLMOutputWithPast",
    "QTSplusConfig",
    "QTSplusInputs",
    "QTSplusQwen2_5_VLForConditionalGeneration",
    "QTSplusProcessor",
    "QTSplusSelection",
    "QTSplusVideoTextToTextPipeline",
    "__version__",
    "load_video",
    "save_checkpoint",
]
