"""Safe, lean loading of Stable Diffusion v1 checkpoints (`.ckpt`/`.pt`/`.pth` and `.safetensors`).

A checkpoint file is untrusted input: nothing in it may run code. `.ckpt` pickles are read by torch's
weights-only unpickler with a short allow-list (`safe_pickle`); any other Python object is refused by name.
Files are memory-mapped and their tensors assigned to a model built without weights, so loading SD v1
(4.3 GB) takes about the file's size in memory rather than three times it (`loading`).

    from ldm.checkpoint import load_model_from_config
    model = load_model_from_config("configs/stable-diffusion/v1-inference.yaml", "sd-v1-4.ckpt")

Modules: `files` (reading a file, its format by content, its fingerprint), `safe_pickle` (the allow-list), `keys` (SD v1 key conventions: CLIP
`text_model.` level, EMA names), `loading` (into a model), `errors`, `diffusers_folder` and `diffusers_keys`
(a diffusers-format SD v1 pipeline folder read as one state dict in this project's names).

Add-ons for SD v1: `controlnet` (ControlNet v1.1 files and diffusers ControlNetModel folders), `lora` and
`lora_keys` (kohya / A1111 and diffusers LoRA files merged as weight deltas), `bases` (refusing an add-on made
for SD 2.x or SDXL).
"""
from ldm.checkpoint.errors import (CheckpointError, CheckpointMismatchError, CheckpointReadError,
                                   OtherBaseModelError, UnsafeCheckpointError)
from ldm.checkpoint.files import (LoadedCheckpoint, checkpoint_fingerprint, checkpoint_format, load_checkpoint,
                                  load_state_dict_file)
from ldm.checkpoint.keys import ema_key, has_ema_weights, remap_checkpoint_keys
from ldm.checkpoint.loading import LoadReport, load_model_from_config, load_state_dict_into, parameters_on_meta
from ldm.checkpoint.safe_pickle import LightningCallbackStandIn

__all__ = [
    "CheckpointError", "CheckpointMismatchError", "CheckpointReadError", "OtherBaseModelError", "UnsafeCheckpointError",
    "LoadedCheckpoint", "checkpoint_fingerprint", "checkpoint_format", "load_checkpoint", "load_state_dict_file",
    "ema_key", "has_ema_weights", "remap_checkpoint_keys",
    "LoadReport", "load_model_from_config", "load_state_dict_into", "parameters_on_meta",
    "LightningCallbackStandIn",
]
