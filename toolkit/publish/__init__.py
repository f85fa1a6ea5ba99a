"""Publishing to the Hugging Face Hub: access checks, the upload plan and the model card."""
