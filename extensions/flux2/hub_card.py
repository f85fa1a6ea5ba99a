"""What a pushed FLUX.2 LoRA's model card says: Hub tags, the base models' licenses, a diffusers snippet."""

from toolkit.publish.model_card import CardInfo, register_card_info

KLEIN_4B = "black-forest-labs/FLUX.2-klein-base-4B"
KLEIN_9B = "black-forest-labs/FLUX.2-klein-base-9B"
DEV = "black-forest-labs/FLUX.2-dev"
_APACHE = {"license": "apache-2.0"}
_NON_COMMERCIAL = {"license": "other", "license_name": "flux-non-commercial-license"}

USAGE = '''import torch
from diffusers import {pipeline}
from diffusers.utils import load_image

pipe = {pipeline}.from_pretrained("{{base}}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{{repo_id}}", weight_name="{{weight_name}}")
# one image per control folder the LoRA was trained with, in the same order
image = pipe(image=[load_image("input.png")], prompt="{{prompt}}", guidance_scale={guidance}).images[0]
image.save("output.png")
'''
_TAGS = ("flux2", "image-to-image", "diffusers", "lora")

FLUX2_KLEIN_4B_CARD = CardInfo(title="FLUX.2 [klein] 4B", tags=("flux2-klein", *_TAGS), pipeline_tag="image-to-image",
                               default_base=KLEIN_4B, licenses={KLEIN_4B: _APACHE},
                               usage=USAGE.format(pipeline="Flux2KleinPipeline", guidance=4.0))
FLUX2_KLEIN_9B_CARD = CardInfo(title="FLUX.2 [klein] 9B", tags=("flux2-klein", *_TAGS), pipeline_tag="image-to-image",
                               default_base=KLEIN_9B, licenses={KLEIN_9B: _NON_COMMERCIAL},
                               usage=USAGE.format(pipeline="Flux2KleinPipeline", guidance=4.0))
FLUX2_DEV_CARD = CardInfo(title="FLUX.2 [dev]", tags=("flux2-dev", *_TAGS), pipeline_tag="image-to-image",
                          default_base=DEV, licenses={DEV: _NON_COMMERCIAL},
                          usage=USAGE.format(pipeline="Flux2Pipeline", guidance=4.0))

register_card_info("flux2_klein_4b", FLUX2_KLEIN_4B_CARD)
register_card_info("flux2_klein_9b", FLUX2_KLEIN_9B_CARD)
register_card_info("flux2", FLUX2_DEV_CARD)
