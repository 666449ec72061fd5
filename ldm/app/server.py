"""The page's HTTP server: one model loaded once, one generation at a time, on 127.0.0.1 only.

Routes: GET / (the page), POST /generate (a form as JSON -> {"job": id}, or {"error": line} for a bad
value), GET /status/<id> (progress, then the result or the error line), GET /files/<path> (the PNGs
and text files of the output folder: the page's images and its downloads).

A submitted form is checked exactly as txt2img checks its flags: the form becomes the builder's values
(`ldm.app.form.form_values`), the same `RunValues` txt2img makes of its flags, checked by the same
`ldm.generation.builder.prepare_run`, and its errors are the CLI's one line. The checked request is
generated with `ldm.generation.generate` and saved with `save_result`, so every image is the CLI's
image, with the CLI's PNG metadata. A bad run writes nothing: the run's folder (`outdir/run-NNNN`) is
made only after the generation succeeded, and holds the images, the grid, the equivalent txt2img
command (`ldm.cli.command_flags`) and, for per-image prompts, the prompt file that command reads.

Requests whose Host is not this server's own address are refused, so a web page elsewhere cannot
reach the server through a name that resolves to 127.0.0.1.
"""
from __future__ import annotations

import json
import shlex
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote, unquote, urlsplit

from ldm.app.form import basic_fields, form_values, sharing_fields
from ldm.app.page import render_page
from ldm.cli import GENERATION_FLAGS, USER_ERRORS, UsageError, command_flags, error_line
from ldm.generation import GenerationResult, LoadedModel, Progress, generate, new_numbered_folder, save_result
from ldm.generation.builder import PreparedRun, RunValues, prepare_run, with_model_defaults
from ldm.modules.shared_attention import valid_group_names

HOST = "127.0.0.1"
SERVED_SUFFIXES = {".png": "image/png", ".txt": "text/plain; charset=utf-8"}


@dataclass
class Job:
    """One generation: checked before it starts, then run in a thread that updates it."""

    id: str
    run: PreparedRun
    values: RunValues  # what the form asked for: the equivalent txt2img command is made of them
    state: str = "running"  # "running", "done" or "error"
    done: int = 0
    total: int = 0
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    def report(self, progress: Progress) -> None:
        self.done = progress.batch * progress.steps + progress.step
        self.total = progress.batches * progress.steps

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "done": self.done, "total": self.total, "error": self.error,
                "result": self.result}


class App:
    """What the page needs: the model, the values that name it (`base`: config, checkpoint, device,
    precision, EMA, as txt2img's flags give them) and the output folder."""

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
            raise UsageError("a generation is already running; wait until it has finished")
        try:
            job = self._prepare(values)
        except BaseException:
            self._busy.release()
            raise
        self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(job,), daemon=True).start()
        return job

    def _prepare(self, values: dict[str, Any]) -> Job:
        run_values = form_values(values, [*self.basic, *self.sharing], self.base)
        run = prepare_run(run_values)
        return Job(uuid.uuid4().hex, run, run_values)

    def _run(self, job: Job) -> None:
        try:
            result = generate(self.model, job.run.request, progress=job.report)
            folder = new_numbered_folder(self.outdir, "run-")
            written = save_result(result, folder)
            command = self.command(job, folder)
            (folder / "command.txt").write_text(command + "\n", encoding="utf-8")
            if job.values.prompts is not None:
                (folder / "prompts.txt").write_text("\n".join(job.values.prompts) + "\n", encoding="utf-8")
            job.result = self._describe(result, written, command)
            job.state = "done"
        except USER_ERRORS as error:
            job.error, job.state = error_line(error, GENERATION_FLAGS), "error"
        except Exception as error:  # noqa: BLE001 - the page gets one line, the console the traceback
            traceback.print_exc()
            job.error, job.state = f"error: the generation failed ({type(error).__name__}: {error})", "error"
        finally:
            self._busy.release()

    def command(self, job: Job, folder: Path) -> str:
        """The txt2img command that makes the same images into `folder`."""
        tokens = command_flags(job.values, prompt_file=str(folder / "prompts.txt"))
        return "python scripts/txt2img.py " + shlex.join([*tokens, "--outdir", str(folder)])

    def _describe(self, result: GenerationResult, written: list[Path], command: str) -> dict[str, Any]:
        """The result as the page shows it: rows of images with their files, the grid, the settings."""
        paths = iter(written)  # save_result's order: every sample in order, then the grid
        rows = [{"label": batch.row_label,
                 "images": [{"url": self.url(next(paths)), "prompt": s.metadata["prompt"], "seed": s.metadata["seed"]}
                            for s in batch.images]}
                for batch in result.batches]
        return {"rows": rows, "grid": self.url(next(paths)), "command": command,
                "settings": json.dumps(result.metadata, indent=1, sort_keys=True)}

    def url(self, path: Path) -> str:
        return "/files/" + quote(path.relative_to(self.outdir).as_posix())

    def file(self, url_path: str) -> Optional[Path]:
        """The output file a /files/ path names, or None outside the output folder or of another kind."""
        root = self.outdir.resolve()
        path = (root / unquote(url_path)).resolve()
        if path.is_relative_to(root) and path.is_file() and path.suffix in SERVED_SUFFIXES:
            return path
        return None


class PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, app: App, port: int):
        super().__init__((HOST, port), Handler)
        self.app = app

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"


class Handler(BaseHTTPRequestHandler):
    server: PageServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self._own_host():
            return
        app, path = self.server.app, urlsplit(self.path).path
        if path == "/":
            self._send(200, "text/html; charset=utf-8", app.page)
        elif path.startswith("/status/") and path[len("/status/"):] in app.jobs:
            self._json(200, app.jobs[path[len("/status/"):]].status())
        elif path.startswith("/files/") and (file := app.file(path[len("/files/"):])) is not None:
            self._send(200, SERVED_SUFFIXES[file.suffix], file.read_bytes())
        else:
            self._json(404, {"error": f"error: nothing at {path}"})

    def do_POST(self) -> None:  # noqa: N802
        if not self._own_host():
            return
        if urlsplit(self.path).path != "/generate" or self.headers.get("Content-Type") != "application/json":
            self._json(404, {"error": "error: POST a JSON form to /generate"})
            return
        try:
            values = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            if not isinstance(values, dict):
                raise UsageError("the form must be a JSON object")
            job = self.server.app.submit(values)
        except json.JSONDecodeError as error:
            self._json(400, {"error": f"error: the form is not JSON ({error})"})
        except USER_ERRORS as error:
            self._json(400, {"error": error_line(error, GENERATION_FLAGS)})
        else:
            self._json(200, {"job": job.id})

    def _own_host(self) -> bool:
        port = self.server.server_address[1]
        if self.headers.get("Host") in (f"{HOST}:{port}", f"localhost:{port}"):
            return True
        self._json(403, {"error": "error: open the page at " + self.server.url})
        return False

    def _json(self, status: int, value: dict[str, Any]) -> None:
        self._send(status, "application/json", json.dumps(value).encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: the console shows errors only
        pass


def serve(app: App, port: int = 0) -> PageServer:
    """A server for `app` on 127.0.0.1:`port` (0: a free port), not yet serving (call serve_forever)."""
    return PageServer(app, port)
