"""What is trained on top of the frozen base: LoRA and LoKr through peft, their file layouts (diffusers, ComfyUI),
the network type, and which parameters train (adapter or the whole transformer)."""
