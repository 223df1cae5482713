"""InternVL2 chat configuration: the project's own re-implementation of the interface of
OpenGVLab's ``InternVLChatConfig`` (same class name, keys and defaults that xtuner and
LMDeploy read), composing the InternViT and InternLM2 configs shipped beside it, or transformers' own Phi-3
config for InternVL2-4B's Phi-3 LLM (the official 4B ships a copy of the same Phi-3 code)."""

import copy

from transformers.configuration_utils import PretrainedConfig

from .configuration_intern_vit import InternVisionConfig
from .configuration_internlm2 import InternLM2Config


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(
        self,
        vision_config=None,
        llm_config=None,
        use_backbone_lora=0,
        use_llm_lora=0,
        select_layer=-1,
        force_image_size=None,
        downsample_ratio=0.5,
        template=None,
        dynamic_image_size=False,
        use_thumbnail=False,
        ps_version="v1",
        min_dynamic_patch=1,
        max_dynamic_patch=6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        vision_config = vision_config or {}
        llm_config = llm_config or {"architectures": ["InternLM2ForCausalLM"]}
        self.vision_config = InternVisionConfig(**vision_config)
        architecture = (llm_config.get("architectures") or ["InternLM2ForCausalLM"])[0]
        if architecture == "InternLM2ForCausalLM":
            self.llm_config = InternLM2Config(**llm_config)
        elif architecture == "Phi3ForCausalLM":
            from transformers import Phi3Config

            self.llm_config = Phi3Config(**llm_config)
        else:
            raise ValueError(f"unsupported llm architecture: {architecture}")
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        # As InternVL's published config does: the chat model ties its output head exactly when
        # its LLM does (never, for InternVL2). Left at PretrainedConfig's default (True), LMDeploy
        # reads it and replaces the output head by the token embeddings.
        self.tie_word_embeddings = self.llm_config.tie_word_embeddings

    def to_dict(self):
        output = copy.deepcopy(self.__dict__)
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        output["model_type"] = self.__class__.model_type
        return output
