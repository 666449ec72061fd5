"""Building a checked run from the values a front end collects, with no front end's knowledge.

    from ldm.generation.builder import RunValues, SharingValues, prepare_run
    run = prepare_run(RunValues(prompt="a chair", demo=True, sharing=SharingValues(groups="all"), compare=True))
    # run.request (a checked GenerationRequest), run.spec, run.ckpt, run.device, run.output, run.notes

The command line (ldm/cli.py) maps its flags to `RunValues` and errors to its one line; the web page
(ldm/app/) maps its form to the same values. Errors name the values' fields (`InvalidValue`,
`SettingsError` with `{field}` placeholders), never a flag.

Modules: `values` (RunValues, SharingValues, the SD v1 and demo defaults), `sharing` (the sharing
settings the values describe), `model_files` (config and checkpoint checked before any weight
loads), `prepare` (`prepare_run`: everything else, each file read once).
"""
from ldm.generation.builder.model_files import (CheckedModel, check_checkpoint, check_model, check_unet_input,
                                              read_config, resolve_path)
from ldm.generation.builder.prepare import OutputPlan, PreparedRun, prepare_run
from ldm.generation.builder.sharing import sharing_settings
from ldm.generation.builder.values import (DEMO_CKPT, DEMO_CONFIG, DEMO_DEFAULTS, SD_CKPT, SD_CONFIG, SD_DEFAULTS,
                                         RunValues, SharingValues, model_defaults, with_model_defaults)

__all__ = [
    "CheckedModel", "check_checkpoint", "check_model", "check_unet_input", "read_config", "resolve_path",
    "OutputPlan", "PreparedRun", "prepare_run", "sharing_settings",
    "DEMO_CKPT", "DEMO_CONFIG", "DEMO_DEFAULTS", "SD_CKPT", "SD_CONFIG", "SD_DEFAULTS", "RunValues", "SharingValues",
    "model_defaults", "with_model_defaults",
]
