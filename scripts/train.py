"""Train a model from a config with PyTorch Lightning: the demo autoencoder, then the demo latent diffusion.

    python scripts/train.py --config configs/demo/autoencoder.yaml --out models/demo/autoencoder.safetensors
    python scripts/train.py --config configs/demo/demo-inference.yaml configs/demo/demo-train.yaml \
        --out models/demo/demo.safetensors --dtype float16

Several configs are merged in order (later ones override). The merged config holds `model` (target/params, base_learning_rate), `data` (a dataset target/params and
batch_size) and `trainer` (max_steps, seed, ...). The result is the model's state dict as a
.safetensors file (EMA weights swapped in when the model keeps them; `--dtype float16` halves the file).
Training is seeded and runs on the CPU by default; an existing output is never overwritten unless
--force is given, and the file appears only once training has finished.

Several processes or GPUs (Lightning's DDP; gloo on the CPU, NCCL on GPUs):

    python scripts/train.py --config ... --out ... --devices 2 --strategy ddp --accelerator cpu

(or trainer.devices / trainer.strategy / trainer.accelerator in the config; flags win). Lightning starts
the other processes by running this command again; only rank 0 writes the output. One step then
averages N x batch_size items: max_steps and the learning rate are used as given (README, "Training on
several processes or GPUs").
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ldm.cli import UsageError, run_cli  # noqa: E402
from ldm.generation.builder import resolve_path  # noqa: E402
from ldm.lightning import Processes, lightning_adapter  # noqa: E402
from ldm.util import check_targets, instantiate_from_config, load_config_file  # noqa: E402


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(config: Any) -> tuple[torch.nn.Module, torch.utils.data.DataLoader]:
    model = instantiate_from_config(config.model)
    model.learning_rate = float(config.model.get("base_learning_rate", 1e-4))
    dataset = instantiate_from_config(config.data)
    encode = config.data.get("encode_first_stage", None)
    if encode:  # latent diffusion on a CPU: encode the training images once (ldm/data/latents.py)
        from ldm.data.latents import EncodedDataset
        dataset = EncodedDataset(dataset, model.first_stage_model, length=int(encode))
    loader = torch.utils.data.DataLoader(dataset, batch_size=int(config.data.get("batch_size", 16)), shuffle=False,
                                         num_workers=0, drop_last=True)
    return model, loader


def trained_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights to ship: the EMA average in place of the raw weights when the model keeps one.

    The noise schedule stays float32 whatever `dtype` is: loaders that read it from the file (ours computes
    it from the config) would otherwise get it rounded.
    """
    from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS
    scope = model.ema_scope() if getattr(model, "use_ema", False) else torch.no_grad()
    with scope:
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("model_ema.")}
    return {k: (v.to(dtype) if v.is_floating_point() and k not in SCHEDULE_BUFFERS else v).contiguous()
            for k, v in state.items()}


def save_atomically(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write next to the target, then rename: an interrupted run leaves any earlier file intact."""
    from safetensors.torch import save_file
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=out.parent, suffix=".partial")
    os.close(handle)
    try:
        save_file(state, temporary, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes the file private; give it normal permissions
        os.replace(temporary, out)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def processes_of(config: Any, accelerator: Optional[str] = None, devices: Optional[int] = None,
                 strategy: Optional[str] = None) -> Processes:
    """The processes to train on: the given values, else the config's trainer section, else one CPU process."""
    trainer_config = config.get("trainer", {})
    return Processes(accelerator=accelerator or trainer_config.get("accelerator", "cpu"),
                     devices=devices if devices is not None else trainer_config.get("devices", 1),
                     strategy=strategy or trainer_config.get("strategy", "auto"))


def train(config: Any, out: Path, *, max_steps: Optional[int] = None, dtype: torch.dtype = torch.float32,
          progress: bool = True, processes: Optional[Processes] = None) -> torch.nn.Module:
    """Train and save to `out` (rank 0 only, when several processes train); returns the trained model."""
    import pytorch_lightning as pl
    processes = processes or processes_of(config)
    trainer_config = config.get("trainer", {})
    seed = int(trainer_config.get("seed", 0))
    seed_everything(seed)
    model, loader = build(config)
    steps = int(max_steps if max_steps is not None else trainer_config.get("max_steps", 1000))
    from pytorch_lightning.callbacks import TQDMProgressBar
    trainer = pl.Trainer(max_steps=steps, accelerator=processes.accelerator, devices=processes.devices,
                         strategy=processes.strategy, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         enable_progress_bar=progress,
                         callbacks=[TQDMProgressBar(refresh_rate=25)] if progress else None,
                         gradient_clip_val=trainer_config.get("gradient_clip_val", None))
    trainer.fit(lightning_adapter(model, seed=seed), train_dataloaders=loader)
    if trainer.is_global_zero:  # DDP leaves the same weights in every process; one file is written
        metadata = {"config": OmegaConf.to_yaml(config), "steps": str(steps), "seed": str(seed),
                    "processes": str(trainer.world_size)}
        save_atomically(trained_state_dict(model, dtype), out, metadata)
    return model


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, nargs="+",
                        help="training config(s) with model, data and trainer sections; later files override")
    parser.add_argument("--out", required=True, help="where to write the trained weights (.safetensors)")
    parser.add_argument("--max_steps", type=int, default=None, help="override trainer.max_steps")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="dtype of the saved weights")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.add_argument("--accelerator", default=None, help="cpu (default), gpu or auto (trainer.accelerator)")
    parser.add_argument("--devices", type=int, default=None,
                        help="processes to train on, one per device (default 1; trainer.devices)")
    parser.add_argument("--strategy", default=None,
                        help="auto (default) or ddp: how several processes are joined (trainer.strategy)")
    opt = parser.parse_args(argv)
    config_paths, out = [resolve_path(p) for p in opt.config], Path(opt.out)
    for path in config_paths:
        if not path.exists():
            raise UsageError(f"config file not found: {path}")
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {opt.out}: weights are written as .safetensors; give a name ending in .safetensors")
    if out.exists() and not opt.force:
        raise UsageError(f"{out} exists; pass --force to replace it, or choose another --out")
    config = OmegaConf.merge(*(load_config_file(p) for p in config_paths))
    check_targets(config)  # every target allowed before anything is built
    processes = processes_of(config, opt.accelerator, opt.devices, opt.strategy)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    train(config, out, max_steps=opt.max_steps, dtype=getattr(torch, opt.dtype), processes=processes)
    from pytorch_lightning.utilities import rank_zero_only
    if rank_zero_only.rank == 0:
        print(f"wrote {out}")


# An InvalidValue of the processes names the flag (or config entry) that sets it.
TRAIN_FLAGS = {"accelerator": "--accelerator (trainer.accelerator)", "devices": "--devices (trainer.devices)",
               "strategy": "--strategy (trainer.strategy)"}


if __name__ == "__main__":
    run_cli(main, flags=TRAIN_FLAGS)
