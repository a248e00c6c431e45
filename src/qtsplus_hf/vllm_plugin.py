"""vLLM plugin entry point (`vllm.general_plugins`): makes vLLM serve QTSplus checkpoint folders.

vLLM calls `register` in every engine and worker process before it builds a config or loads a model. The model
module (`qtsplus_hf.vllm_qtsplus`) is named by string and imported only when a QTSplus folder is served; `register`
itself imports `qtsplus_hf` for its transformers Auto-class registrations (the folder's config type).
"""

from __future__ import annotations

ARCHITECTURE = "QTSplusQwen2_5_VLForConditionalGeneration"


def register() -> None:
    """Register the QTSplus architecture and the CPU runner's pruning switch with vLLM."""
    from vllm import ModelRegistry

    import qtsplus_hf  # noqa: F401  (registers QTSplusConfig / QTSplusProcessor with the Auto classes)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"qtsplus_hf.vllm_qtsplus:{ARCHITECTURE}")
    enable_pruning_on_cpu_runner()


def enable_pruning_on_cpu_runner() -> None:
    """Give vLLM's CPU runner the video-pruning switch its GPU runner sets after loading the model, for QTSplus.

    vLLM 0.32's `CPUModelRunner.load_model` never sets `is_multimodal_pruning_enabled`, so on the CPU build the
    kept tokens' positions would never be written (EVS fails there the same way). The flag is set with the GPU
    runner's own test, for QTSplus models only; other models and platforms are left as they are.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner.load_model, "qtsplus_sets_pruning", False):
        return
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    load_model = CPUModelRunner.load_model

    def load_model_with_pruning(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        model = self.get_model()
        if type(model).__name__ != ARCHITECTURE:
            return
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = bool(
            supports_multimodal_pruning(model) and mm_config is not None and mm_config.is_multimodal_pruning_enabled()
        )

    load_model_with_pruning.qtsplus_sets_pruning = True
    CPUModelRunner.load_model = load_model_with_pruning
