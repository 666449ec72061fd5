"""The page's generations: a submitted form checked by the builder, run in a thread, saved only whole.

`App.submit` turns a form into the builder's values (`ldm.app.form.form_values`: the same `RunValues`
txt2img makes of its flags), checks them with `ldm.generation.builder.prepare_run` under the page's
limits (`PAGE_LIMITS`), and starts a `Job`. One job runs at a time; `App.cancel` stops it at its next
sampler step. A job writes nothing until its images exist: then the run folder (`outdir/run-NNNN`)
gets the images, the grid, the equivalent txt2img command (`ldm.cli.command_flags`), the per-image
prompt file and the uploaded references that command reads; if any of that fails, the folder is
removed, so a failed or cancelled job leaves nothing behind.
"""
from __future__ import annotations

import json
import shlex
import shutil
import threading
import traceback
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote, unquote

from ldm.app.form import basic_fields, form_values, sharing_fields
from ldm.app.page import render_page
from ldm.app.uploads import ReferenceFiles
from ldm.cli import GENERATION_FLAGS, USER_ERRORS, UsageError, command_flags, error_line
from ldm.generation import GenerationResult, LoadedModel, Progress, generate, new_numbered_folder, save_result
from ldm.generation.builder import PreparedRun, RunValues, prepare_run, with_model_defaults
from ldm.generation.limits import Limits
from ldm.sharing import valid_group_names

SERVED_SUFFIXES = {".png": "image/png", ".txt": "text/plain; charset=utf-8"}
# What one generation on the page may ask for (the CLI's limits are a GPU user's; the page is a demo).
PAGE_LIMITS = Limits(max_side=1024, max_batch_size=16, max_images=16, max_steps=150, max_prompts=16,
                     max_prompt_chars=1000)
# How the page's errors name a setting: the CLI's flags (its fields show them), and its own limits.
PAGE_FLAGS = {**GENERATION_FLAGS, "limits": "starting scripts/app.py with --no-limits"}


class JobCancelled(Exception):
    """Raised inside a job's progress report once the page asked to cancel it."""


@dataclass
class Job:
    """One generation: checked before it starts, then run in a thread that updates it."""

    id: str
    run: PreparedRun
    values: RunValues  # what the form asked for: the equivalent txt2img command is made of them
    references: ReferenceFiles
    state: str = "running"  # "running", "done", "error" or "cancelled"
    done: int = 0
    total: int = 0
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False

    def report(self, progress: Progress) -> None:
        if self.cancelled:
            raise JobCancelled
        self.done = progress.batch * progress.steps + progress.step
        self.total = progress.batches * progress.steps

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "done": self.done, "total": self.total, "error": self.error,
                "result": self.result}


class App:
    """What the page needs: the model, the values that name it (`base`: config, checkpoint, device,
    precision, EMA, as txt2img's flags give them, and the limits, e.g. PAGE_LIMITS) and the output folder."""

    def __init__(self, model: LoadedModel, base: RunValues, outdir: Path):
        self.model, self.base = model, with_model_defaults(base)  # the model's defaults fill the form
        self.outdir = Path(outdir)
        self.basic, self.sharing = basic_fields(self.base), sharing_fields()
        self.groups = valid_group_names(model.unet)
        self.page = render_page(self).encode()
        self.jobs: dict[str, Job] = {}
        self._busy = threading.Lock()

    def submit(self, values: dict[str, Any]) -> Job:
        """Check a submitted form as txt2img would and start generating it; raises a user error."""
        if not self._busy.acquire(blocking=False):
            raise UsageError("a generation is already running; wait until it has finished, or cancel it")
        references = ReferenceFiles(self.file)
        try:
            run_values = form_values(values, [*self.basic, *self.sharing], self.base, references.resolve)
            job = Job(uuid.uuid4().hex, prepare_run(run_values), run_values, references)
        except BaseException:
            references.close()
            self._busy.release()
            raise
        self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(job,), daemon=True).start()
        return job

    def cancel(self, job_id: str) -> bool:
        """Ask a running job to stop at its next step; False if there is no such running job."""
        job = self.jobs.get(job_id)
        if job is None or job.state != "running":
            return False
        job.cancelled = True
        return True

    def _run(self, job: Job) -> None:
        try:
            result = generate(self.model, job.run.request, progress=job.report)
            job.result = self._save(job, result)
            job.state = "done"
        except JobCancelled:
            job.error, job.state = "error: cancelled; nothing was written", "cancelled"
        except USER_ERRORS as error:
            job.error, job.state = error_line(error, PAGE_FLAGS), "error"
        except Exception as error:  # noqa: BLE001 - the page gets one line, the console the traceback
            traceback.print_exc()
            job.error, job.state = f"error: the generation failed ({type(error).__name__}: {error})", "error"
        finally:
            job.references.close()
            self._busy.release()

    def _save(self, job: Job, result: GenerationResult) -> dict[str, Any]:
        """Write the run folder whole, or remove what was written of it and raise."""
        folder = new_numbered_folder(self.outdir, "run-")
        try:
            written = save_result(result, folder)
            values = self._copy_uploads(job, folder)
            command = self.command(values, folder)
            (folder / "command.txt").write_text(command + "\n", encoding="utf-8")
            if values.prompts is not None:
                (folder / "prompts.txt").write_text("\n".join(values.prompts) + "\n", encoding="utf-8")
            return self._describe(result, written, command)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _copy_uploads(self, job: Job, folder: Path) -> RunValues:
        """The job's values with each uploaded reference copied into `folder/references/`, where the
        command finds it."""
        if not job.references.uploads:
            return job.values
        (folder / "references").mkdir()
        copies = {}
        for upload, name in job.references.uploads.items():
            copies[str(upload)] = str(shutil.copyfile(upload, folder / "references" / name))
        return replace(job.values, references=tuple(copies.get(str(r), r) for r in job.values.references))

    def command(self, values: RunValues, folder: Path) -> str:
        """The txt2img command that makes the same images into `folder`."""
        tokens = command_flags(values, prompt_file=str(folder / "prompts.txt"))
        return "python scripts/txt2img.py " + shlex.join([*tokens, "--outdir", str(folder)])

    def _describe(self, result: GenerationResult, written: list[Path], command: str) -> dict[str, Any]:
        """The result as the page shows it: rows of images with their files, the grid, the settings."""
        paths = iter(written)  # save_result's order: every sample in order, then the grid
        rows = [{"label": batch.row_label,
                 # a reference picture's row has its file name instead of a prompt and seed
                 "images": [{"url": self.url(next(paths)), "prompt": s.metadata.get("prompt", s.metadata.get("reference")),
                             "seed": s.metadata.get("seed")} for s in batch.images]}
                for batch in result.batches]
        return {"rows": rows, "grid": self.url(next(paths)), "command": command,
                "settings": json.dumps(result.metadata, indent=1, sort_keys=True)}

    def url(self, path: Path) -> str:
        return "/files/" + quote(path.relative_to(self.outdir).as_posix())

    def file(self, url_path: str) -> Optional[Path]:
        """The output file a /files/ path names, or None for anything else (outside the output folder, of
        another kind, a name no file system takes): one answer, whether or not something is there."""
        root = self.outdir.resolve()
        try:
            path = (root / unquote(url_path, errors="strict")).resolve()
            found = path.is_relative_to(root) and path.is_file() and path.suffix in SERVED_SUFFIXES
        except (ValueError, OSError):  # a NUL or an undecodable byte in the name, a name too long, ...
            return None
        return path if found else None
