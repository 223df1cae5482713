"""InternVL2 chat model: the project's own small re-implementation of the interface of
OpenGVLab's ``InternVLChatModel``. Attribute and parameter names (``vision_model``,
``language_model``, ``mlp1``, ``extract_feature``, ``img_context_token_id``) are the ones
xtuner and LMDeploy look up, so a model built with it trains, merges and loads like the
real InternVL2 checkpoint."""

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_internvl_chat import InternVLChatConfig
from .modeling_intern_vit import InternVisionModel, has_flash_attn
from .modeling_internlm2 import InternLM2ForCausalLM


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    _no_split_modules = ["InternVisionModel", "InternLM2DecoderLayer", "Phi3DecoderLayer"]
    _supports_flash_attn_2 = True

    def __init__(self, config, vision_model=None, language_model=None, use_flash_attn=True):
        super().__init__(config)
        image_size = config.force_image_size or config.vision_config.image_size
        patch_size = config.vision_config.patch_size
        self.patch_size = patch_size
        self.select_layer = config.select_layer
        self.template = config.template
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = int((image_size // patch_size) ** 2 * (config.downsample_ratio**2))
        # As in the official model: fall back to eager attention when flash-attn is missing.
        use_flash_attn = use_flash_attn and has_flash_attn
        config.vision_config.use_flash_attn = use_flash_attn
        config.llm_config.attn_implementation = "flash_attention_2" if use_flash_attn else "eager"
        self.phi3 = config.llm_config.architectures[0] == "Phi3ForCausalLM"
        if self.phi3:
            # transformers' own Phi-3 reads the private field (XTuner sets it to flash_attention_2)
            config.llm_config._attn_implementation = config.llm_config.attn_implementation

        self.vision_model = vision_model or InternVisionModel(config.vision_config)
        if language_model is None and self.phi3:
            from transformers import Phi3ForCausalLM

            language_model = Phi3ForCausalLM(config.llm_config)
        self.language_model = language_model or InternLM2ForCausalLM(config.llm_config)

        vit_hidden_size = config.vision_config.hidden_size
        llm_hidden_size = config.llm_config.hidden_size
        merged = vit_hidden_size * int(1 / self.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(merged),
            nn.Linear(merged, llm_hidden_size),
            nn.GELU(),
            nn.Linear(llm_hidden_size, llm_hidden_size),
        )
        self.img_context_token_id = None

    def pixel_shuffle(self, x, scale_factor=0.5):
        n, w, h, c = x.size()
        x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
        if self.ps_version != "v1":
            x = x.permute(0, 2, 1, 3).contiguous()
        return x

    def extract_feature(self, pixel_values):
        if self.select_layer == -1:
            vit_embeds = self.vision_model(
                pixel_values=pixel_values, output_hidden_states=False, return_dict=True
            ).last_hidden_state
        else:
            vit_embeds = self.vision_model(
                pixel_values=pixel_values, output_hidden_states=True, return_dict=True
            ).hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]  # drop the class token
        side = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    def _merge_image_embeddings(self, input_ids, pixel_values, image_flags=None):
        input_embeds = self.language_model.get_input_embeddings()(input_ids)
        vit_embeds = self.extract_feature(pixel_values)
        if image_flags is not None:
            vit_embeds = vit_embeds[image_flags.squeeze(-1) == 1]
        batch, seq, hidden = input_embeds.shape
        input_embeds = input_embeds.reshape(batch * seq, hidden)
        selected = input_ids.reshape(batch * seq) == self.img_context_token_id
        if int(selected.sum()) != vit_embeds.shape[0] * vit_embeds.shape[1]:
            raise ValueError(
                f"{int(selected.sum())} <IMG_CONTEXT> tokens for "
                f"{vit_embeds.shape[0]} tiles of {vit_embeds.shape[1]} image tokens"
            )
        input_embeds[selected] = vit_embeds.reshape(-1, hidden).to(input_embeds.dtype)
        return input_embeds.reshape(batch, seq, hidden)

    def forward(
        self,
        pixel_values,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        image_flags=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        input_embeds = self._merge_image_embeddings(input_ids, pixel_values, image_flags)
        outputs = self.language_model(
            inputs_embeds=input_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            labels=labels,
            return_dict=True,
        )
        return CausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, **generate_kwargs):
        if self.img_context_token_id is None:
            raise ValueError("set model.img_context_token_id (the id of <IMG_CONTEXT>) first")
        if pixel_values is not None:
            input_embeds = self._merge_image_embeddings(input_ids, pixel_values)
        else:
            input_embeds = self.language_model.get_input_embeddings()(input_ids)
        # InternLM2's prepare_inputs_for_generation uses inputs_embeds only while
        # past_key_values is None; transformers >= 4.45 pre-creates an empty DynamicCache for
        # models that support cache classes, so the image embeddings would be dropped. Ask
        # generate() for the legacy cache path instead (the one the official code was built on).
        if not self.phi3:  # transformers' own Phi-3 handles inputs_embeds with its cache classes
            self.language_model._supports_cache_class = False
        return self.language_model.generate(
            inputs_embeds=input_embeds,
            attention_mask=attention_mask,
            use_cache=True,
            **generate_kwargs,
        )
