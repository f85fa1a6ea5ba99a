"""What a pushed FLUX.1 Kontext LoRA's model card says: Hub tags, the base models' licenses, a diffusers snippet."""

from toolkit.publish.model_card import CardInfo, register_card_info

KONTEXT_DEV = "black-forest-labs/FLUX.1-Kontext-dev"
_DEV_LICENSE = {"license": "other", "license_name": "flux-1-dev-non-commercial-license",
                "license_link": f"https://huggingface.co/{KONTEXT_DEV}/blob/main/LICENSE.md"}

USAGE = '''import torch
from diffusers import FluxKontextPipeline
from diffusers.utils import load_image

pipe = FluxKontextPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{repo_id}", weight_name="{weight_name}")
image = pipe(image=load_image("input.png"), prompt="{prompt}", guidance_scale=2.5).images[0]
image.save("output.png")
'''

FLUX_KONTEXT_CARD = CardInfo(
    title="FLUX.1 Kontext", tags=("flux", "flux-kontext", "kontext", "image-to-image", "diffusers", "lora"),
    pipeline_tag="image-to-image", default_base=KONTEXT_DEV, licenses={KONTEXT_DEV: _DEV_LICENSE}, usage=USAGE)

register_card_info("flux_kontext", FLUX_KONTEXT_CARD)
