"""Generating images: a checked request in, PIL images with their metadata out (the Python API).

    from ldm.generation import DEMO_SCALE, GenerationRequest, generate, load_demo_model
    result = generate(load_demo_model(), GenerationRequest(prompt="a chair", steps=25, scale=DEMO_SCALE))

Modules: `request` (what to generate, checked), `generate` (the run), `model` (configs, loading,
devices), `sampling` (one batch of latents), `images` (pictures, grids, PNG metadata), `inputs`
(prompt files, init images), `outputs` (numbered files and folders, never overwriting).
"""
from ldm.generation.generate import (BatchImages, GeneratedImage, GenerationResult, NonFiniteError, Progress,
                                     generate)
from ldm.generation.images import image_grid, image_to_tensor, read_png_metadata, tensor_to_images
from ldm.generation.inputs import fit_to_multiple, open_image, read_prompt_file
from ldm.generation.model import (DEMO_SCALE, ConfigError, LatentGeometry, LoadedModel, ModelSpec, choose_device,
                                  load_demo_model, load_model, precision_scope, read_model_spec)
from ldm.generation.outputs import OutputFolder, check_output_folder, new_numbered_folder, save_result
from ldm.generation.request import GenerationRequest
from ldm.generation.sampling import (batches, decode_to_images, encode_init_image, encode_steps, generate_latents,
                                     img2img_latents, make_sampler)
from ldm.sharing import SharedAttentionSettings

__all__ = [
    "BatchImages", "GeneratedImage", "GenerationResult", "NonFiniteError", "Progress", "generate",
    "image_grid", "image_to_tensor", "read_png_metadata", "tensor_to_images",
    "fit_to_multiple", "open_image", "read_prompt_file",
    "DEMO_SCALE", "ConfigError", "LatentGeometry", "LoadedModel", "ModelSpec", "choose_device", "load_demo_model",
    "load_model",
    "precision_scope", "read_model_spec",
    "OutputFolder", "check_output_folder", "new_numbered_folder", "save_result",
    "GenerationRequest", "batches", "decode_to_images", "encode_init_image", "encode_steps", "generate_latents",
    "img2img_latents", "make_sampler", "SharedAttentionSettings",
]
