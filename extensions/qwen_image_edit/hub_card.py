"""What a pushed Qwen-Image-Edit(-Plus) LoRA's model card says: Hub tags, the base models' license, a snippet."""

from toolkit.publish.model_card import CardInfo, register_card_info

EDIT_2509 = "Qwen/Qwen-Image-Edit-2509"
EDIT = "Qwen/Qwen-Image-Edit"
_APACHE = {"license": "apache-2.0"}

USAGE_PLUS = '''import torch
from diffusers import QwenImageEditPlusPipeline
from diffusers.utils import load_image

pipe = QwenImageEditPlusPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{repo_id}", weight_name="{weight_name}")
# one image per control folder the LoRA was trained with, in the same order
image = pipe(image=[load_image("input.png")], prompt="{prompt}", negative_prompt=" ", true_cfg_scale=4.0).images[0]
image.save("output.png")
'''

QWEN_EDIT_PLUS_CARD = CardInfo(
    title="Qwen-Image-Edit-Plus", tags=("qwen-image", "qwen-image-edit", "image-to-image", "diffusers", "lora"),
    pipeline_tag="image-to-image", default_base=EDIT_2509,
    licenses={EDIT_2509: _APACHE, "Qwen/Qwen-Image-Edit-2511": _APACHE}, usage=USAGE_PLUS)

QWEN_EDIT_CARD = CardInfo(
    title="Qwen-Image-Edit", tags=QWEN_EDIT_PLUS_CARD.tags, pipeline_tag="image-to-image", default_base=EDIT,
    licenses={EDIT: _APACHE},
    usage=USAGE_PLUS.replace("QwenImageEditPlusPipeline", "QwenImageEditPipeline")
    .replace("image=[load_image(\"input.png\")]", "image=load_image(\"input.png\")")
    .replace("# one image per control folder the LoRA was trained with, in the same order\n", ""))

register_card_info("qwen_image_edit_plus", QWEN_EDIT_PLUS_CARD)
register_card_info("qwen_image_edit", QWEN_EDIT_CARD)
